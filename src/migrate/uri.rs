//! Migration URIs as QEMU spells them: `tcp:HOST:PORT` (IPv4, `[IPv6]`, or a host name),
//! `unix:PATH`, and `defer` on the destination.

use std::fmt;
use std::path::PathBuf;

/// Where a migration stream goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// What `-incoming` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Listen(MigrationUri),
    /// Wait for QMP `migrate-incoming`.
    Defer,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid migration URI '{uri}': {reason} (expected tcp:HOST:PORT, tcp:[IPv6]:PORT or unix:PATH)")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl MigrationUri {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        let error = |reason: &str| UriError {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(error("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let Some(address) = uri.strip_prefix("tcp:") else {
            return Err(error("unknown transport"));
        };
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| error("unclosed '[' in IPv6 address"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| error("missing :PORT after the IPv6 address"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(error("bad IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = address
                .rsplit_once(':')
                .ok_or_else(|| error("missing :PORT"))?;
            if host.is_empty() {
                return Err(error("empty host"));
            }
            let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if !host.chars().all(valid) {
                return Err(error(
                    "bad host (an IPv6 address goes in brackets: tcp:[::1]:PORT)",
                ));
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| error("the port must be a number from 1 to 65535"))?;
        if port == 0 {
            return Err(error("the port must be a number from 1 to 65535"));
        }
        Ok(Self::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Incoming {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        if uri == "defer" {
            Ok(Self::Defer)
        } else {
            MigrationUri::parse(uri).map(Self::Listen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let tcp = |host: &str, port| MigrationUri::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4446").unwrap(),
            tcp("127.0.0.1", 4446)
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:4446").unwrap(),
            tcp("::1", 4446)
        );
        assert_eq!(
            MigrationUri::parse("tcp:localhost:1").unwrap(),
            tcp("localhost", 1)
        );
        assert_eq!(
            MigrationUri::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(Incoming::parse("defer").unwrap(), Incoming::Defer);
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:4446").unwrap().to_string(),
            "tcp:[::1]:4446"
        );
    }

    #[test]
    fn refused_forms_say_why() {
        for (uri, reason) in [
            ("tcp:127.0.0.1", "missing :PORT"),
            ("tcp::4446", "empty host"),
            ("tcp:host:0", "the port must be"),
            ("tcp:host:99999", "the port must be"),
            ("tcp:[::1:4446", "unclosed"),
            ("unix:", "empty socket path"),
            ("rdma:1.2.3.4:5", "unknown transport"),
            ("exec:cat", "unknown transport"),
        ] {
            let error = MigrationUri::parse(uri).unwrap_err().to_string();
            assert!(error.contains(reason), "{uri}: {error}");
        }
    }
}
