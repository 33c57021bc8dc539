//! QMP against real ferry processes running the built-in guest: every command, with what the
//! guest and the host really show; events on several sessions; twenty clients at once; clients
//! that die mid-request; QEMU's Python library; and `ncat -U` replaying StratoVirt's migration
//! guide between two ferry processes.
//!
//! Every test takes `common::kvm_turn()` (one VM at a time on two cores) and bounds every wait.
//! `qmp_protocol.rs` tests the same server against a fake VM owner; these tests check that the
//! real owner behaves the way that fake one does, and the way QEMU does.

mod common;

#[path = "qmp_vm/client.rs"]
mod client;
#[path = "qmp_vm/commands.rs"]
mod commands;
#[path = "qmp_vm/external.rs"]
mod external;
#[path = "qmp_vm/lifecycle.rs"]
mod lifecycle;
#[path = "qmp_vm/sessions.rs"]
mod sessions;
#[path = "qmp_vm/support.rs"]
mod support;
