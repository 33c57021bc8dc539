//! The one save/restore trait every stateful part of the VM implements, the versioned sections
//! its state travels in, and the description of a VM that both ends compare before any RAM.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::machine::memory::RamRange;

/// Why state could not be saved or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("cannot save {what}: {reason}")]
    Save { what: String, reason: String },
    #[error("cannot restore {what}: {reason}")]
    Restore { what: String, reason: String },
    #[error("{id}: the stream carries {found} state version {version}, this ferry reads {kind} version {supported}")]
    Version {
        id: String,
        kind: String,
        found: String,
        version: u32,
        supported: u32,
    },
    #[error("{id}: malformed {kind} state: {reason}")]
    Decode {
        id: String,
        kind: String,
        reason: String,
    },
    #[error("the stream has no state for {0}")]
    Missing(String),
    #[error("the stream has state for {0}, which this VM does not have")]
    Unexpected(String),
}

/// A part of the VM whose state migrates. Save reads the part as it is (the VM is paused);
/// restore puts a saved state into a part built from the same configuration.
///
/// There is deliberately no default: a part that forgets to implement this cannot migrate
/// silently empty.
pub trait Migratable {
    /// The kind of part, as the stream names it ("vcpu", "serial", ...).
    const KIND: &'static str;
    /// The version of `State`'s encoding; bump it when `State` changes.
    const VERSION: u32;
    type State: Serialize + DeserializeOwned;

    fn save_state(&self) -> Result<Self::State, StateError>;
    fn restore_state(&mut self, state: Self::State) -> Result<(), StateError>;
}

/// One part's state in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    /// The part's id, unique in the VM ("vcpu0", "serial0", "kvm").
    pub id: String,
    pub kind: String,
    pub version: u32,
    pub data: Vec<u8>,
}

impl Section {
    pub fn save<T: Migratable>(id: &str, part: &T) -> Result<Self, StateError> {
        let state = part.save_state()?;
        let data = postcard::to_stdvec(&state).map_err(|e| StateError::Save {
            what: id.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            id: id.to_owned(),
            kind: T::KIND.to_owned(),
            version: T::VERSION,
            data,
        })
    }

    /// Decodes the section as `T`'s state, checking its kind and version first.
    pub fn decode<T: Migratable>(&self) -> Result<T::State, StateError> {
        if self.kind != T::KIND || self.version != T::VERSION {
            return Err(StateError::Version {
                id: self.id.clone(),
                kind: T::KIND.to_owned(),
                found: self.kind.clone(),
                version: self.version,
                supported: T::VERSION,
            });
        }
        postcard::from_bytes(&self.data).map_err(|e| StateError::Decode {
            id: self.id.clone(),
            kind: self.kind.clone(),
            reason: e.to_string(),
        })
    }
}

/// The sections of a whole VM, looked up by id; every one must be used exactly once.
#[derive(Debug, Default)]
pub struct Sections {
    by_id: BTreeMap<String, Section>,
}

impl Sections {
    pub fn new(sections: Vec<Section>) -> Result<Self, StateError> {
        let mut by_id = BTreeMap::new();
        for section in sections {
            let id = section.id.clone();
            if by_id.insert(id.clone(), section).is_some() {
                return Err(StateError::Decode {
                    id,
                    kind: "section".into(),
                    reason: "appears twice".into(),
                });
            }
        }
        Ok(Self { by_id })
    }

    pub fn take(&mut self, id: &str) -> Result<Section, StateError> {
        self.by_id
            .remove(id)
            .ok_or_else(|| StateError::Missing(id.to_owned()))
    }

    /// Fails on the first section nobody took.
    pub fn finish(self) -> Result<(), StateError> {
        match self.by_id.into_keys().next() {
            Some(id) => Err(StateError::Unexpected(id)),
            None => Ok(()),
        }
    }
}

/// One CPUID register of features the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    /// "eax", "ebx", "ecx" or "edx".
    pub register: char,
    pub bits: u32,
}

/// A device as the configuration check compares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    pub kind: String,
    pub id: String,
    pub attributes: BTreeMap<String, String>,
}

/// What must be equal on both sides of a migration, sent before any RAM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    pub machine: String,
    pub mem_bytes: u64,
    pub ram: Vec<RamRange>,
    pub vcpus: u32,
    pub cpu_features: Vec<FeatureWord>,
    pub devices: Vec<DeviceDescription>,
}

impl VmDescription {
    /// Checks that a guest described by `source` can run here (`self`); the error names the
    /// first difference and what to do about it.
    pub fn check_source(&self, source: &VmDescription) -> Result<(), String> {
        if source.machine != self.machine {
            return Err(format!(
                "machine type differs: source {}, destination {} (start the destination with -machine {})",
                source.machine, self.machine, source.machine
            ));
        }
        if source.mem_bytes != self.mem_bytes || source.ram != self.ram {
            return Err(format!(
                "RAM size differs: source {} MiB, destination {} MiB (start the destination with -m {})",
                source.mem_bytes >> 20,
                self.mem_bytes >> 20,
                source.mem_bytes >> 20
            ));
        }
        if source.vcpus != self.vcpus {
            return Err(format!(
                "vCPU count differs: source {}, destination {} (start the destination with -smp {})",
                source.vcpus, self.vcpus, source.vcpus
            ));
        }
        for word in &source.cpu_features {
            let here = self
                .cpu_features
                .iter()
                .find(|w| {
                    (w.leaf, w.subleaf, w.register) == (word.leaf, word.subleaf, word.register)
                })
                .map_or(0, |w| w.bits);
            let missing = word.bits & !here;
            if missing != 0 {
                return Err(format!(
                    "this host's KVM lacks CPU features the guest uses: CPUID leaf {:#x}.{} {} bits {missing:#010x}",
                    word.leaf,
                    word.subleaf,
                    register_name(word.register)
                ));
            }
        }
        for device in &source.devices {
            match self.devices.iter().find(|d| d.id == device.id) {
                None => {
                    return Err(format!(
                        "device '{}' ({}) exists on the source but not on the destination",
                        device.id, device.kind
                    ))
                }
                Some(here) if here.kind != device.kind => {
                    return Err(format!(
                        "device '{}' is a {} on the source but a {} on the destination",
                        device.id, device.kind, here.kind
                    ))
                }
                Some(here) if here.attributes != device.attributes => {
                    return Err(format!(
                        "device '{}' ({}) differs: {}; start the destination with the source's \
                         settings",
                        device.id,
                        device.kind,
                        attribute_differences(&device.attributes, &here.attributes)
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self
            .devices
            .iter()
            .find(|d| !source.devices.iter().any(|s| s.id == d.id))
        {
            return Err(format!(
                "device '{}' ({}) exists on the destination but not on the source",
                extra.id, extra.kind
            ));
        }
        Ok(())
    }
}

fn register_name(register: char) -> &'static str {
    match register {
        'a' => "EAX",
        'b' => "EBX",
        'c' => "ECX",
        _ => "EDX",
    }
}

/// "serial is \"a\" on the source, \"b\" on the destination; ..." for every key that differs.
fn attribute_differences(
    source: &BTreeMap<String, String>,
    destination: &BTreeMap<String, String>,
) -> String {
    let shown = |value: Option<&String>| value.map_or("unset".to_owned(), |v| format!("{v:?}"));
    let keys: std::collections::BTreeSet<&String> =
        source.keys().chain(destination.keys()).collect();
    keys.into_iter()
        .filter(|key| source.get(*key) != destination.get(*key))
        .map(|key| {
            format!(
                "{key} is {} on the source, {} on the destination",
                shown(source.get(key)),
                shown(destination.get(key))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description() -> VmDescription {
        VmDescription {
            machine: "q35".into(),
            mem_bytes: 512 << 20,
            ram: vec![RamRange {
                start: 0,
                size: 512 << 20,
            }],
            vcpus: 2,
            cpu_features: vec![FeatureWord {
                leaf: 1,
                subleaf: 0,
                register: 'c',
                bits: 0x8000_0001,
            }],
            devices: vec![DeviceDescription {
                kind: "serial".into(),
                id: "serial0".into(),
                attributes: BTreeMap::from([("port".into(), "0x3f8".into())]),
            }],
        }
    }

    #[test]
    fn identical_configurations_match() {
        assert_eq!(description().check_source(&description()), Ok(()));
    }

    #[test]
    fn every_mismatch_is_named() {
        let here = description();
        let mut memory = description();
        memory.mem_bytes = 1 << 30;
        memory.ram[0].size = 1 << 30;
        assert!(here.check_source(&memory).unwrap_err().contains("-m 1024"));
        let mut cpus = description();
        cpus.vcpus = 1;
        assert!(here.check_source(&cpus).unwrap_err().contains("-smp 1"));
        let mut machine = description();
        machine.machine = "pc".into();
        assert!(here
            .check_source(&machine)
            .unwrap_err()
            .contains("machine type"));
        let mut features = description();
        features.cpu_features[0].bits |= 0x10;
        let error = here.check_source(&features).unwrap_err();
        assert!(error.contains("ECX bits 0x00000010"), "{error}");
        let mut device = description();
        device.devices[0]
            .attributes
            .insert("port".into(), "0x2f8".into());
        assert!(here.check_source(&device).unwrap_err().contains("serial0"));
        let mut missing = description();
        missing.devices.clear();
        assert!(here
            .check_source(&missing)
            .unwrap_err()
            .contains("not on the source"));
    }

    #[test]
    fn fewer_features_on_the_source_are_fine() {
        let here = description();
        let mut source = description();
        source.cpu_features[0].bits = 1;
        assert_eq!(here.check_source(&source), Ok(()));
    }

    struct Counter(u64);

    impl Migratable for Counter {
        const KIND: &'static str = "counter";
        const VERSION: u32 = 3;
        type State = u64;

        fn save_state(&self) -> Result<u64, StateError> {
            Ok(self.0)
        }

        fn restore_state(&mut self, state: u64) -> Result<(), StateError> {
            self.0 = state;
            Ok(())
        }
    }

    #[test]
    fn sections_round_trip_and_check_versions() {
        let section = Section::save("c0", &Counter(77)).unwrap();
        let mut restored = Counter(0);
        restored
            .restore_state(section.decode::<Counter>().unwrap())
            .unwrap();
        assert_eq!(restored.0, 77);
        let mut old = section.clone();
        old.version = 2;
        assert!(matches!(
            old.decode::<Counter>(),
            Err(StateError::Version { .. })
        ));
        let mut garbage = section.clone();
        garbage.data = vec![0xff; 11];
        assert!(matches!(
            garbage.decode::<Counter>(),
            Err(StateError::Decode { .. })
        ));
    }

    #[test]
    fn every_section_must_be_used_once() {
        let a = Section::save("a", &Counter(1)).unwrap();
        let b = Section::save("b", &Counter(2)).unwrap();
        assert!(Sections::new(vec![a.clone(), a.clone()]).is_err());
        let mut sections = Sections::new(vec![a, b]).unwrap();
        sections.take("a").unwrap();
        assert_eq!(sections.take("z"), Err(StateError::Missing("z".into())));
        assert_eq!(sections.finish(), Err(StateError::Unexpected("b".into())));
    }
}
