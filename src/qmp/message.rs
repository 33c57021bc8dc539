//! What the server writes: the greeting, command replies and error classes. Events are
//! written as the `Serialize` form of [`Event`](crate::runtime::control::Event).

use serde::Serialize;
use serde_json::{json, Value};

use super::command::CommandError;

/// `{"QMP":{"version":...,"capabilities":[]}}`, sent once on connect. No capabilities are
/// offered: in particular no `oob`, so clients never send `exec-oob`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct GreetingBody {
    version: VersionInfo,
    capabilities: [&'static str; 0],
}

impl Greeting {
    pub fn current() -> Self {
        Self {
            qmp: GreetingBody {
                version: VersionInfo::current(),
                capabilities: [],
            },
        }
    }
}

/// QEMU's `VersionInfo`, as in the greeting and `query-version`: ferry reports its own crate
/// version in the `qemu` triple (clients only need it to be well formed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VersionTriple {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

impl VersionInfo {
    pub fn current() -> Self {
        // Cargo sets these from the package version, so they are always plain integers.
        let part = |text: &str| text.parse().unwrap_or(0);
        Self {
            qemu: VersionTriple {
                major: part(env!("CARGO_PKG_VERSION_MAJOR")),
                minor: part(env!("CARGO_PKG_VERSION_MINOR")),
                micro: part(env!("CARGO_PKG_VERSION_PATCH")),
            },
            package: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn to_value(&self) -> Value {
        let VersionTriple {
            major,
            minor,
            micro,
        } = self.qemu;
        json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.package})
    }
}

/// QMP's error classes; ferry uses the two that QEMU still uses for these cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

/// The reply to one request: `{"return":...}` or `{"error":{...}}`, with the request's `id`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum Response {
    Return {
        #[serde(rename = "return")]
        value: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    Error {
        error: ErrorBody,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ErrorBody {
    class: ErrorClass,
    desc: String,
}

impl Response {
    pub(crate) fn new(id: Option<Value>, outcome: Result<Value, CommandError>) -> Self {
        match outcome {
            Ok(value) => Self::Return { value, id },
            Err(err) => Self::Error {
                error: ErrorBody {
                    class: err.class(),
                    desc: err.to_string(),
                },
                id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_has_qemus_shape() {
        let greeting = serde_json::to_value(Greeting::current()).unwrap();
        let version = &greeting["QMP"]["version"];
        assert_eq!(
            version["package"],
            format!("ferry {}", env!("CARGO_PKG_VERSION"))
        );
        assert!(version["qemu"]["major"].is_u64() && version["qemu"]["micro"].is_u64());
        assert_eq!(greeting["QMP"]["capabilities"], json!([]));
        assert_eq!(*version, VersionInfo::current().to_value());
    }

    #[test]
    fn replies_carry_the_id_only_when_given() {
        let ok = Response::new(Some(json!({"n": [1]})), Ok(json!({})));
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"return":{},"id":{"n":[1]}}"#
        );
        let err = Response::new(None, Err(CommandError::CommandNotFound("x".into())));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"error":{"class":"CommandNotFound","desc":"The command x has not been found"}}"#
        );
    }
}
