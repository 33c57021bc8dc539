//! Migration capabilities: QEMU's on/off switches (`migrate-set-capabilities`,
//! `query-migrate-capabilities`), so that a client written for QEMU finds the ones it checks.
//!
//! ferry has `auto-converge`, on by default (unlike QEMU): every guest must converge with the
//! default settings, and a guest that dirties memory faster than the link carries it converges
//! only when its vCPUs are held back. Its migration events are always sent, so `events` is
//! always on. Every other capability QEMU lists names a feature ferry does not have: it is
//! listed as off, and may be set off but not on.

use serde_json::{json, Value};

const AUTO_CONVERGE: &str = "auto-converge";
const EVENTS: &str = "events";
const MULTIFD: &str = "multifd";
/// QEMU's other capabilities, in its order.
const ABSENT: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "zero-blocks",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("'{0}' is not a migration capability; query-migrate-capabilities lists them")]
    Unknown(String),
    #[error("ferry does not have the migration capability '{0}'; it can only be off")]
    Absent(String),
    #[error("ferry always sends its migration events; 'events' cannot be turned off")]
    EventsOff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Hold the vCPUs back when rounds stop shrinking (the throttle parameters say how hard).
    pub auto_converge: bool,
    /// Pages travel over `multifd-channels` connections of their own (see `lanes`). Only the
    /// source's setting counts: a destination takes the connections a source opens.
    pub multifd: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            auto_converge: true,
            multifd: true,
        }
    }
}

impl Capabilities {
    /// Applies `(capability, state)` pairs; nothing changes unless every pair is acceptable.
    pub fn update(&mut self, changes: &[(String, bool)]) -> Result<(), CapabilityError> {
        let mut updated = *self;
        for (name, state) in changes {
            match (name.as_str(), *state) {
                (AUTO_CONVERGE, state) => updated.auto_converge = state,
                (MULTIFD, state) => updated.multifd = state,
                (EVENTS, true) => {}
                (EVENTS, false) => return Err(CapabilityError::EventsOff),
                (absent, false) if ABSENT.contains(&absent) => {}
                (absent, true) if ABSENT.contains(&absent) => {
                    return Err(CapabilityError::Absent(absent.to_owned()))
                }
                (unknown, _) => return Err(CapabilityError::Unknown(unknown.to_owned())),
            }
        }
        *self = updated;
        Ok(())
    }

    /// The `query-migrate-capabilities` answer: every capability with its state.
    pub fn to_json(self) -> Value {
        let known = [
            (AUTO_CONVERGE, self.auto_converge),
            (EVENTS, true),
            (MULTIFD, self.multifd),
        ];
        let absent = ABSENT.iter().map(|name| (*name, false));
        known
            .into_iter()
            .chain(absent)
            .map(|(capability, state)| json!({"capability": capability, "state": state}))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, state: bool) -> (String, bool) {
        (name.to_owned(), state)
    }

    #[test]
    fn auto_converge_is_on_by_default_and_can_be_turned_off() {
        let mut capabilities = Capabilities::default();
        assert!(capabilities.auto_converge);
        capabilities
            .update(&[change("auto-converge", false), change("multifd", false)])
            .unwrap();
        assert!(!capabilities.auto_converge);
        let listed = capabilities.to_json();
        assert_eq!(
            listed[0],
            json!({"capability": "auto-converge", "state": false})
        );
        assert_eq!(listed.as_array().unwrap().len(), 3 + ABSENT.len());
    }

    #[test]
    fn a_refused_change_changes_nothing() {
        let mut capabilities = Capabilities::default();
        for (changes, error) in [
            (
                vec![change("auto-converge", false), change("postcopy-ram", true)],
                CapabilityError::Absent("postcopy-ram".into()),
            ),
            (
                vec![change("auto-converge", false), change("events", false)],
                CapabilityError::EventsOff,
            ),
            (
                vec![
                    change("auto-converge", false),
                    change("auto-convergence", true),
                ],
                CapabilityError::Unknown("auto-convergence".into()),
            ),
        ] {
            assert_eq!(capabilities.update(&changes), Err(error));
            assert!(capabilities.auto_converge);
        }
    }
}
