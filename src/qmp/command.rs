//! The commands ferry understands: `Command::from_request` parses and validates one request,
//! `Command::apply` answers it, locally or through the VM owner.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::args::Args;
use super::frame::{Frame, MAX_REQUEST_BYTES};
use super::message::{ErrorClass, VersionInfo};
use crate::migrate::wire::MAX_LANES;
use crate::runtime::control::{MigrationParameterUpdate, Request, RequestError, VmHandle};

/// Every command `query-commands` lists, in QEMU's spelling (`_` and `-` as QEMU has them).
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-name",
    "query-status",
    "stop",
    "cont",
    "quit",
    "system_reset",
    "system_powerdown",
    "query-cpus-fast",
    "pmemsave",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

/// QEMU's upper bound for `downtime-limit`: 2000 seconds, in milliseconds.
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// One validated request.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    QmpCapabilities,
    QueryVersion,
    QueryCommands,
    QueryName,
    /// Answered by the VM owner; its reply is the `return` value.
    Vm(Request),
}

/// Why a request was refused. The `Display` text is the `desc` the client sees, so it says
/// what was wrong; the wording follows QEMU's where QEMU has one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("JSON parse error, {0}")]
    Json(String),
    #[error(
        "QMP request exceeds {MAX_REQUEST_BYTES} bytes; input was discarded up to the next newline"
    )]
    Oversize,
    #[error("QMP input must be a JSON object")]
    NotAnObject,
    #[error("QMP input lacks member 'execute'")]
    MissingExecute,
    #[error("QMP input member 'execute' must be a string")]
    ExecuteNotString,
    #[error("QMP input member 'arguments' must be an object")]
    ArgumentsNotObject,
    #[error("QMP input member '{0}' is unexpected")]
    UnexpectedMember(String),
    #[error("out-of-band execution ('exec-oob') is not supported: the greeting offers no 'oob'")]
    OutOfBand,
    #[error("The command {0} has not been found")]
    CommandNotFound(String),
    #[error("Capability '{0}' not available")]
    CapabilityNotAvailable(String),
    #[error("Parameter '{0}' is missing")]
    MissingArgument(&'static str),
    #[error("Parameter '{name}' is unexpected; {takes}")]
    UnexpectedArgument { name: String, takes: String },
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidArgumentType {
        name: &'static str,
        expected: &'static str,
    },
    #[error("Parameter '{name}' {problem}")]
    InvalidArgumentValue { name: &'static str, problem: String },
    #[error("Parameter '{name}' is not supported: {why}")]
    Unsupported {
        name: &'static str,
        why: &'static str,
    },
    /// The VM owner refused or failed the request.
    #[error("{0}")]
    Vm(RequestError),
}

impl CommandError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::CommandNotFound(_) => ErrorClass::CommandNotFound,
            _ => ErrorClass::GenericError,
        }
    }
}

/// Decodes one frame into the request's `id` (echoed in the reply, even an error reply) and
/// the command. Input that is not a JSON object has no `id` to echo, as in QEMU.
pub(crate) fn decode(frame: Frame) -> (Option<Value>, Result<Command, CommandError>) {
    let bytes = match frame {
        Frame::Value(bytes) => bytes,
        Frame::Oversize => return (None, Err(CommandError::Oversize)),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(request) => (request.get("id").cloned(), Command::from_request(request)),
        Err(err) => (None, Err(CommandError::Json(err.to_string()))),
    }
}

impl Command {
    /// Checks the request envelope (`execute`, `arguments`, `id`, nothing else), then the
    /// command's arguments.
    pub fn from_request(request: Value) -> Result<Self, CommandError> {
        let Value::Object(mut request) = request else {
            return Err(CommandError::NotAnObject);
        };
        request.remove("id");
        if request.contains_key("exec-oob") {
            return Err(CommandError::OutOfBand);
        }
        let name = match request.remove("execute") {
            None => return Err(CommandError::MissingExecute),
            Some(Value::String(name)) => name,
            Some(_) => return Err(CommandError::ExecuteNotString),
        };
        let arguments = match request.remove("arguments") {
            None => Map::new(),
            Some(Value::Object(arguments)) => arguments,
            Some(_) => return Err(CommandError::ArgumentsNotObject),
        };
        if let Some(member) = request.keys().next() {
            return Err(CommandError::UnexpectedMember(member.clone()));
        }
        Self::parse(&name, arguments)
    }

    fn parse(name: &str, arguments: Map<String, Value>) -> Result<Self, CommandError> {
        if let Some(command) = Self::without_arguments(name) {
            // Unknown arguments are refused even here, as QEMU does.
            Args::new(name, &[], arguments)?;
            return Ok(command);
        }
        match name {
            "qmp_capabilities" => {
                let mut args = Args::new(name, &["enable"], arguments)?;
                // The greeting offers no capability, so there is nothing to enable.
                match args
                    .optional_strings("enable")?
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                {
                    Some(capability) => Err(CommandError::CapabilityNotAvailable(capability)),
                    None => Ok(Self::QmpCapabilities),
                }
            }
            "pmemsave" => pmemsave(arguments),
            "migrate" => migrate(arguments),
            "migrate-incoming" => {
                let mut args = Args::new(name, &["uri"], arguments)?;
                Ok(Self::Vm(Request::MigrateIncoming {
                    uri: uri(&mut args)?,
                }))
            }
            "migrate-set-parameters" => migrate_set_parameters(arguments),
            "migrate-set-capabilities" => migrate_set_capabilities(arguments),
            _ => Err(CommandError::CommandNotFound(name.to_owned())),
        }
    }

    fn without_arguments(name: &str) -> Option<Self> {
        Some(match name {
            "query-version" => Self::QueryVersion,
            "query-commands" => Self::QueryCommands,
            "query-name" => Self::QueryName,
            "query-status" => Self::Vm(Request::QueryStatus),
            "stop" => Self::Vm(Request::Stop),
            "cont" => Self::Vm(Request::Cont),
            "quit" => Self::Vm(Request::Quit),
            "system_reset" => Self::Vm(Request::SystemReset),
            "system_powerdown" => Self::Vm(Request::SystemPowerdown),
            "query-cpus-fast" => Self::Vm(Request::QueryCpusFast),
            "migrate_cancel" => Self::Vm(Request::MigrateCancel),
            "query-migrate" => Self::Vm(Request::QueryMigrate),
            "query-migrate-parameters" => Self::Vm(Request::QueryMigrateParameters),
            "query-migrate-capabilities" => Self::Vm(Request::QueryMigrateCapabilities),
            _ => return None,
        })
    }

    /// Answers the command: locally, or by a call to the VM owner (which has its own deadline,
    /// [`REQUEST_DEADLINE`](crate::runtime::control::REQUEST_DEADLINE)).
    pub async fn apply(self, vm: &VmHandle) -> Result<Value, CommandError> {
        match self {
            Self::QmpCapabilities => Ok(json!({})),
            Self::QueryVersion => Ok(VersionInfo::current().to_value()),
            Self::QueryCommands => Ok(COMMAND_NAMES
                .iter()
                .map(|name| json!({"name": name}))
                .collect()),
            Self::QueryName => Ok(match vm.name() {
                Some(name) => json!({"name": name}),
                None => json!({}),
            }),
            Self::Vm(request) => vm.call(request).await.map_err(CommandError::Vm),
        }
    }
}

/// `pmemsave {"val": addr, "size": bytes, "filename": path}`: QEMU's argument names.
fn pmemsave(arguments: Map<String, Value>) -> Result<Command, CommandError> {
    let mut args = Args::new("pmemsave", &["val", "size", "filename"], arguments)?;
    let addr = args.u64("val")?;
    let size = args.u64("size")?;
    let filename = args.string("filename")?;
    if addr.checked_add(size).is_none() {
        return Err(CommandError::InvalidArgumentValue {
            name: "size",
            problem: format!(
                "takes the range past the end of the address space ({addr:#x} + {size:#x})"
            ),
        });
    }
    if filename.is_empty() {
        return Err(CommandError::InvalidArgumentValue {
            name: "filename",
            problem: "is empty".into(),
        });
    }
    Ok(Command::Vm(Request::Pmemsave {
        addr,
        size,
        path: PathBuf::from(filename),
    }))
}

/// `migrate {"uri": ...}`. QEMU's `detach` is accepted and ignored (QEMU ignores it too);
/// `blk`, `inc` and `resume` name features ferry does not have, so they may only be false.
fn migrate(arguments: Map<String, Value>) -> Result<Command, CommandError> {
    let mut args = Args::new(
        "migrate",
        &["uri", "detach", "blk", "inc", "resume"],
        arguments,
    )?;
    let uri = uri(&mut args)?;
    args.optional_bool("detach")?;
    let unsupported = [
        (
            "blk",
            "ferry does not migrate block devices (QEMU dropped this too; use NBD mirroring)",
        ),
        (
            "inc",
            "ferry does not migrate block devices, incrementally or otherwise",
        ),
        (
            "resume",
            "ferry has no postcopy, so there is no paused migration to resume",
        ),
    ];
    for (name, why) in unsupported {
        if args.optional_bool(name)? == Some(true) {
            return Err(CommandError::Unsupported { name, why });
        }
    }
    Ok(Command::Vm(Request::Migrate { uri }))
}

/// The URI's scheme is the VM owner's to judge; an empty one is refused here.
fn uri(args: &mut Args) -> Result<String, CommandError> {
    let uri = args.string("uri")?;
    if uri.is_empty() {
        return Err(CommandError::InvalidArgumentValue {
            name: "uri",
            problem: "is empty".into(),
        });
    }
    Ok(uri)
}

fn migrate_set_parameters(arguments: Map<String, Value>) -> Result<Command, CommandError> {
    let mut args = Args::new(
        "migrate-set-parameters",
        &[
            "downtime-limit",
            "max-bandwidth",
            "cpu-throttle-initial",
            "cpu-throttle-increment",
            "max-cpu-throttle",
            "convergence-timeout",
            "multifd-channels",
        ],
        arguments,
    )?;
    let downtime_limit_ms = args.optional_u64("downtime-limit")?;
    if let Some(limit) = downtime_limit_ms.filter(|limit| *limit > MAX_DOWNTIME_LIMIT_MS) {
        return Err(CommandError::InvalidArgumentValue {
            name: "downtime-limit",
            problem: format!(
                "expects an integer in the range of 0 to {MAX_DOWNTIME_LIMIT_MS} milliseconds (got {limit})"
            ),
        });
    }
    let max_bandwidth = args.optional_u64("max-bandwidth")?;
    let mut percent = |name: &'static str| -> Result<Option<u64>, CommandError> {
        let value = args.optional_u64(name)?;
        match value {
            Some(p) if !(1..=99).contains(&p) => Err(CommandError::InvalidArgumentValue {
                name,
                problem: format!("expects a percentage from 1 to 99 (got {p})"),
            }),
            _ => Ok(value),
        }
    };
    let cpu_throttle_initial = percent("cpu-throttle-initial")?;
    let cpu_throttle_increment = percent("cpu-throttle-increment")?;
    let max_cpu_throttle = percent("max-cpu-throttle")?;
    let convergence_timeout_s = args.optional_u64("convergence-timeout")?;
    let multifd_channels = args.optional_u64("multifd-channels")?;
    if let Some(channels) = multifd_channels.filter(|c| !(1..=u64::from(MAX_LANES)).contains(c)) {
        return Err(CommandError::InvalidArgumentValue {
            name: "multifd-channels",
            problem: format!(
                "expects an integer in the range of 1 to {MAX_LANES} (got {channels})"
            ),
        });
    }
    Ok(Command::Vm(Request::MigrateSetParameters(
        MigrationParameterUpdate {
            downtime_limit_ms,
            max_bandwidth,
            cpu_throttle_initial,
            cpu_throttle_increment,
            max_cpu_throttle,
            convergence_timeout_s,
            multifd_channels,
        },
    )))
}

/// `migrate-set-capabilities {"capabilities": [{"capability": NAME, "state": BOOL}, ...]}`;
/// which names exist is the migration's to judge.
fn migrate_set_capabilities(arguments: Map<String, Value>) -> Result<Command, CommandError> {
    let mut args = Args::new("migrate-set-capabilities", &["capabilities"], arguments)?;
    let changes = args
        .objects("capabilities")?
        .into_iter()
        .map(|item| {
            let mut item = Args::new("capabilities", &["capability", "state"], item)?;
            let capability = item.string("capability")?;
            let state = item
                .optional_bool("state")?
                .ok_or(CommandError::MissingArgument("state"))?;
            Ok((capability, state))
        })
        .collect::<Result<_, CommandError>>()?;
    Ok(Command::Vm(Request::MigrateSetCapabilities(changes)))
}

#[cfg(test)]
mod tests;
