//! `-qmp unix:PATH,server,nowait`, QEMU's chardev syntax for a listening QMP socket.

use std::path::PathBuf;

use super::QmpError;

/// Parses the value of `-qmp` into the socket path.
///
/// Accepted: `unix:PATH,server,nowait` and QEMU's long form `unix:PATH,server=on,wait=off`
/// (any mix, in any order; booleans as QEMU spells them: on/off, yes/no, true/false, y/n).
/// A comma inside PATH is written `,,`, as in QEMU. QEMU's default is to *wait* for a client
/// before starting the guest; ferry has no such mode, so the argument must say `nowait`
/// rather than have ferry silently behave differently from what it asked for.
pub fn parse_qmp_arg(arg: &str) -> Result<PathBuf, QmpError> {
    let invalid = |reason: String| QmpError::InvalidArgument {
        arg: arg.to_owned(),
        reason,
    };
    let mut parts = split_options(arg).into_iter();
    let first = parts.next().unwrap_or_default();
    let path = match first.split_once(':') {
        Some(("unix", path)) => path.to_owned(),
        Some((scheme, _)) if !scheme.contains('/') => {
            return Err(invalid(format!(
                "'{scheme}:' sockets are not supported, only unix:"
            )))
        }
        _ => return Err(invalid("the socket must be written unix:PATH".into())),
    };
    if path.is_empty() {
        return Err(invalid("the path after 'unix:' is empty".into()));
    }

    let mut server = None;
    let mut wait = None;
    for option in parts {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option.as_str(), None),
        };
        match (key, value) {
            ("server", _) => server = Some(flag(key, value).map_err(invalid)?),
            ("wait", _) => wait = Some(flag(key, value).map_err(invalid)?),
            ("nowait", None) => wait = Some(false),
            ("", _) => return Err(invalid("empty option (a stray comma?)".into())),
            _ => return Err(invalid(format!("unknown option '{key}'"))),
        }
    }
    match server {
        Some(true) => {}
        Some(false) => {
            return Err(invalid(
                "server=off would make ferry connect out; it only listens".into(),
            ))
        }
        None => {
            return Err(invalid(
                "'server' is missing (ferry listens for QMP clients)".into(),
            ))
        }
    }
    if wait != Some(false) {
        return Err(invalid(
            "ferry cannot wait for a QMP client before starting (QEMU's default); add 'nowait'"
                .into(),
        ));
    }
    Ok(PathBuf::from(path))
}

/// A QEMU boolean option: bare `key` means on.
fn flag(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("on" | "yes" | "true" | "y") => Ok(true),
        Some("off" | "no" | "false" | "n") => Ok(false),
        Some(other) => Err(format!("'{key}={other}' is not a boolean (use on or off)")),
    }
}

/// Splits at single commas; `,,` stands for a literal comma, as in QEMU's option parser.
fn split_options(arg: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.next_if_eq(&',').is_some() {
            current.push(',');
        } else {
            parts.push(std::mem::take(&mut current));
        }
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(arg: &str) -> String {
        parse_qmp_arg(arg).expect_err(arg).to_string()
    }

    #[test]
    fn accepts_the_short_and_long_forms() {
        for arg in [
            "unix:/run/ferry.qmp,server,nowait",
            "unix:/run/ferry.qmp,server=on,wait=off",
            "unix:/run/ferry.qmp,nowait,server",
            "unix:/run/ferry.qmp,server=yes,wait=no",
            "unix:/run/ferry.qmp,server=true,wait=false",
        ] {
            assert_eq!(
                parse_qmp_arg(arg).expect(arg),
                PathBuf::from("/run/ferry.qmp"),
                "{arg}"
            );
        }
    }

    #[test]
    fn keeps_relative_paths_colons_and_escaped_commas() {
        assert_eq!(
            parse_qmp_arg("unix:q.sock,server,nowait").unwrap(),
            PathBuf::from("q.sock")
        );
        assert_eq!(
            parse_qmp_arg("unix:/a:b,server,nowait").unwrap(),
            PathBuf::from("/a:b")
        );
        assert_eq!(
            parse_qmp_arg("unix:/a,,b,server,nowait").unwrap(),
            PathBuf::from("/a,b")
        );
    }

    #[test]
    fn every_error_names_the_problem_and_the_accepted_form() {
        let cases = [
            (
                "tcp:127.0.0.1:4444,server,nowait",
                "'tcp:' sockets are not supported",
            ),
            ("/run/ferry.qmp", "must be written unix:PATH"),
            ("", "must be written unix:PATH"),
            ("unix:,server,nowait", "path after 'unix:' is empty"),
            ("unix:/q,nowait", "'server' is missing"),
            ("unix:/q,server=off,nowait", "only listens"),
            ("unix:/q,server", "cannot wait for a QMP client"),
            ("unix:/q,server,wait=on", "cannot wait for a QMP client"),
            (
                "unix:/q,server=maybe,nowait",
                "'server=maybe' is not a boolean",
            ),
            (
                "unix:/q,server,nowait,iothread=io0",
                "unknown option 'iothread'",
            ),
            ("unix:/q,server,,", "unknown option 'server,'"),
            ("unix:/q,server,nowait,", "empty option"),
        ];
        for (arg, expected) in cases {
            let message = error_of(arg);
            assert!(message.contains(expected), "{arg:?}: {message}");
            assert!(
                message.contains("expected unix:PATH,server,nowait"),
                "{arg:?}: {message}"
            );
        }
    }
}
