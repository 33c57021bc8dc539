//! When the source read the state it sends, so that the destination can run the guest's clocks
//! and timers on by the time the state spent between the two (`machine::state::timers`). The
//! moments travel on the destination's migration clock ([`super::clock`]), onto which the
//! source maps its own: no wall clock is involved.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::clock::{LocalClock, PeerClock, PeerNanos};
use super::state::{Migratable, StateError};

/// The section's id in a STATE message.
pub const SECTION_ID: &str = "saved-at";

/// When each part with a running clock was saved, on the destination's migration clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAt {
    /// Each vCPU's state (its LAPIC timer), in vCPU order.
    pub vcpus_ns: Vec<PeerNanos>,
    /// The in-kernel chips' (KVM's clock).
    pub chips_ns: PeerNanos,
}

impl SavedAt {
    /// The source's moments, mapped onto the destination's clock.
    pub fn mapped(vcpus: &[Instant], chips: Instant, peer: &PeerClock) -> Self {
        Self {
            vcpus_ns: vcpus.iter().map(|&at| peer.peer(at)).collect(),
            chips_ns: peer.peer(chips),
        }
    }

    /// Checks that the source saved as many vCPUs as this side has.
    pub fn check(&self, vcpus: u32) -> Result<(), StateError> {
        if self.vcpus_ns.len() == vcpus as usize {
            return Ok(());
        }
        Err(StateError::Restore {
            what: SECTION_ID.into(),
            reason: format!(
                "the source saved {} vCPUs and this VM has {vcpus}; the configuration check \
                 should have refused this pair: run the same ferry release on both sides",
                self.vcpus_ns.len()
            ),
        })
    }

    /// How long vCPU `index`'s state has been in transit, on the destination ([`Self::check`]
    /// first: an index beyond the list counts as no time).
    pub fn vcpu_age(&self, index: u32, clock: &LocalClock) -> Duration {
        self.vcpus_ns
            .get(index as usize)
            .map_or(Duration::ZERO, |&at| clock.since(at))
    }
}

impl Migratable for SavedAt {
    const KIND: &'static str = "saved-at";
    const VERSION: u32 = 1;
    type State = SavedAt;

    fn save_state(&self) -> Result<SavedAt, StateError> {
        Ok(self.clone())
    }

    fn restore_state(&mut self, state: SavedAt) -> Result<(), StateError> {
        *self = state;
        Ok(())
    }
}
