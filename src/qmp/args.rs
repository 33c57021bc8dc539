//! Typed access to a command's `arguments`, with QEMU's wording for what is wrong.

use serde_json::{Map, Value};

use super::command::CommandError;

/// The `arguments` of one command. Every name is checked against what the command takes
/// before any value is looked at, so a typo (`url`) is reported as such rather than as a
/// missing `uri`.
#[derive(Debug)]
pub(crate) struct Args {
    map: Map<String, Value>,
}

impl Args {
    /// Fails on the first argument `command` does not take, naming those it does.
    pub(crate) fn new(
        command: &str,
        takes: &'static [&'static str],
        map: Map<String, Value>,
    ) -> Result<Self, CommandError> {
        if let Some(name) = map.keys().find(|name| !takes.contains(&name.as_str())) {
            let takes = match takes {
                [] => format!("{command} takes no arguments"),
                names => format!("{command} takes {}", names.join(", ")),
            };
            return Err(CommandError::UnexpectedArgument {
                name: name.clone(),
                takes,
            });
        }
        Ok(Self { map })
    }

    pub(crate) fn string(&mut self, name: &'static str) -> Result<String, CommandError> {
        match self.map.remove(name) {
            None => Err(CommandError::MissingArgument(name)),
            Some(Value::String(text)) => Ok(text),
            Some(_) => Err(CommandError::InvalidArgumentType {
                name,
                expected: "string",
            }),
        }
    }

    pub(crate) fn optional_bool(
        &mut self,
        name: &'static str,
    ) -> Result<Option<bool>, CommandError> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(flag)),
            Some(_) => Err(CommandError::InvalidArgumentType {
                name,
                expected: "boolean",
            }),
        }
    }

    pub(crate) fn u64(&mut self, name: &'static str) -> Result<u64, CommandError> {
        self.optional_u64(name)?
            .ok_or(CommandError::MissingArgument(name))
    }

    /// A JSON integer that must not be negative. A float such as `1.0` is not an integer,
    /// as in QEMU.
    pub(crate) fn optional_u64(&mut self, name: &'static str) -> Result<Option<u64>, CommandError> {
        let Some(value) = self.map.remove(name) else {
            return Ok(None);
        };
        let Value::Number(number) = &value else {
            return Err(CommandError::InvalidArgumentType {
                name,
                expected: "integer",
            });
        };
        if let Some(unsigned) = number.as_u64() {
            Ok(Some(unsigned))
        } else if number.is_i64() {
            Err(CommandError::InvalidArgumentValue {
                name,
                problem: format!("must not be negative (got {number})"),
            })
        } else {
            Err(CommandError::InvalidArgumentType {
                name,
                expected: "integer",
            })
        }
    }

    /// A list of objects (`migrate-set-capabilities`' `capabilities`).
    pub(crate) fn objects(
        &mut self,
        name: &'static str,
    ) -> Result<Vec<Map<String, Value>>, CommandError> {
        let invalid = CommandError::InvalidArgumentType {
            name,
            expected: "array of objects",
        };
        match self.map.remove(name) {
            None => Err(CommandError::MissingArgument(name)),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::Object(object) => Ok(object),
                    _ => Err(invalid.clone()),
                })
                .collect(),
            Some(_) => Err(invalid),
        }
    }

    /// A list of strings (`qmp_capabilities`' `enable`).
    pub(crate) fn optional_strings(
        &mut self,
        name: &'static str,
    ) -> Result<Option<Vec<String>>, CommandError> {
        let invalid = CommandError::InvalidArgumentType {
            name,
            expected: "array of strings",
        };
        match self.map.remove(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) => Ok(text),
                    _ => Err(invalid.clone()),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(_) => Err(invalid),
        }
    }
}
