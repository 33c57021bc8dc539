//! QEMU's `key=value,key=value` property lists, as `-drive` and `-device` take them.
//!
//! As in QEMU, `,,` stands for a literal comma anywhere in the list, so a path like `a,b.img` is
//! written `file=a,,b.img`. Unlike QEMU, a key given twice is refused instead of the last one
//! winning, and a bare key (`readonly`, QEMU's deprecated `readonly=on`) needs its value.

use super::{usage, UsageError};

/// Splits `text` at single commas, turning each `,,` into a literal comma.
pub(super) fn split(text: &str) -> Vec<String> {
    let mut elements = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            elements.last_mut().expect("never empty").push(c);
        } else if chars.next_if_eq(&',').is_some() {
            elements.last_mut().expect("never empty").push(',');
        } else {
            elements.push(String::new());
        }
    }
    elements
}

/// The properties of one option, each key known to be accepted and given once.
pub(super) struct Props<'a> {
    option: &'a str,
    entries: Vec<(String, String)>,
}

impl<'a> Props<'a> {
    /// Checks `elements` (from [`split`]) against the keys `option` accepts. `hint` may explain a
    /// key that is not accepted better than the list of accepted ones does.
    pub(super) fn new(
        option: &'a str,
        elements: Vec<String>,
        accepted: &[&str],
        hint: fn(&str) -> Option<&'static str>,
    ) -> Result<Self, UsageError> {
        let mut entries: Vec<(String, String)> = Vec::with_capacity(elements.len());
        for element in elements {
            let Some((key, value)) = element.split_once('=') else {
                if element.is_empty() {
                    return Err(usage(
                        option,
                        "empty property (a stray comma? a comma inside a value is written ',,')",
                    ));
                }
                return Err(usage(
                    option,
                    format!("'{element}' has no value: write {element}=VALUE"),
                ));
            };
            if !accepted.contains(&key) {
                let why = hint(key)
                    .map(|text| format!(" ({text})"))
                    .unwrap_or_default();
                return Err(usage(
                    option,
                    format!(
                        "unknown property '{key}'{why}; accepted: {}",
                        accepted.join(", ")
                    ),
                ));
            }
            if entries.iter().any(|(seen, _)| seen == key) {
                return Err(usage(
                    option,
                    format!("'{key}' is given twice; give it once"),
                ));
            }
            entries.push((key.to_owned(), value.to_owned()));
        }
        Ok(Self { option, entries })
    }

    pub(super) fn option(&self) -> &'a str {
        self.option
    }

    /// The value of `key`, if given.
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(seen, _)| seen == key)
            .map(|(_, value)| value.as_str())
    }

    /// The value of `key`, which must be given.
    pub(super) fn require(&self, key: &str, why: &str) -> Result<&str, UsageError> {
        self.get(key)
            .ok_or_else(|| usage(self.option, format!("{key}= is required: {why}")))
    }

    /// A boolean `key`: on/off as QEMU spells it, true/false as StratoVirt does, or yes/no.
    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, UsageError> {
        self.get(key)
            .map(|value| match value {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(usage(
                    self.option,
                    format!("{key}={value}: expected on or off (or true/false, yes/no)"),
                )),
            })
            .transpose()
    }
}

/// Whether `id` has the shape QEMU accepts for ids: a letter, then letters, digits, '-', '.',
/// '_'. Ids end up in QMP replies and the migration stream, where anything else would need
/// quoting.
pub(super) fn check_id(option: &str, id: &str) -> Result<(), UsageError> {
    let mut chars = id.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if well_formed {
        Ok(())
    } else {
        Err(usage(
            option,
            format!(
                "id '{id}' is not valid: start with a letter, then use letters, digits, '-', '.' \
                 or '_'"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_hint(_: &str) -> Option<&'static str> {
        None
    }

    fn props(text: &str) -> Result<Props<'static>, UsageError> {
        Props::new("-x", split(text), &["a", "b", "flag"], no_hint)
    }

    #[test]
    fn double_commas_are_literal_commas() {
        assert_eq!(split("a=1,b=2"), ["a=1", "b=2"]);
        assert_eq!(split("a=x,,y,b=2"), ["a=x,y", "b=2"]);
        assert_eq!(split("a=x,,,b=2"), ["a=x,", "b=2"]);
        assert_eq!(split("a=,,,,"), ["a=,,"]);
        assert_eq!(split(""), [""]);
        assert_eq!(split("a=1,"), ["a=1", ""]);
    }

    #[test]
    fn values_by_key() {
        let props = props("a=1,b=x=y").unwrap();
        assert_eq!(props.get("a"), Some("1"));
        assert_eq!(props.get("b"), Some("x=y"));
        assert_eq!(props.get("flag"), None);
        assert_eq!(props.require("a", "why").unwrap(), "1");
        assert_eq!(
            props.require("flag", "it matters").unwrap_err().to_string(),
            "-x: flag= is required: it matters"
        );
    }

    #[test]
    fn every_boolean_spelling() {
        for (text, expected) in [
            ("flag=on", true),
            ("flag=true", true),
            ("flag=yes", true),
            ("flag=off", false),
            ("flag=false", false),
            ("flag=no", false),
        ] {
            assert_eq!(props(text).unwrap().bool("flag").unwrap(), Some(expected));
        }
        assert_eq!(props("a=1").unwrap().bool("flag").unwrap(), None);
        assert_eq!(
            props("flag=ON")
                .unwrap()
                .bool("flag")
                .unwrap_err()
                .to_string(),
            "-x: flag=ON: expected on or off (or true/false, yes/no)"
        );
    }

    #[test]
    fn malformed_lists() {
        let cases = [
            ("a=1,", "-x: empty property (a stray comma?"),
            ("flag", "-x: 'flag' has no value: write flag=VALUE"),
            ("c=1", "-x: unknown property 'c'; accepted: a, b, flag"),
            ("a=1,a=2", "-x: 'a' is given twice; give it once"),
        ];
        for (text, expected) in cases {
            let error = props(text).err().expect(text).to_string();
            assert!(error.starts_with(expected), "{text}: {error}");
        }
    }

    #[test]
    fn hints_explain_unknown_keys() {
        let error = Props::new("-x", split("c=1"), &["a"], |key| {
            (key == "c").then_some("c is spelled a here")
        })
        .err()
        .unwrap();
        assert_eq!(
            error.to_string(),
            "-x: unknown property 'c' (c is spelled a here); accepted: a"
        );
    }

    #[test]
    fn ids() {
        for good in ["d", "disk0", "a-b.c_d", "Z9"] {
            check_id("-x", good).unwrap();
        }
        for bad in ["", "0disk", "-d", "a b", "a,b", "a/b", "é"] {
            let error = check_id("-x", bad).unwrap_err().to_string();
            assert!(error.contains("is not valid"), "{bad}: {error}");
        }
    }
}
