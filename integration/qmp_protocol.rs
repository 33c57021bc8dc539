//! The QMP server over a real UNIX socket, against a fake VM owner.
//!
//! The fake owner (`qmp/support.rs`) is a small state machine, running or paused with
//! migration parameters, that answers `Envelope`s the way the real one must and emits
//! STOP/RESUME. Every wait is bounded by `support::WAIT`. The tests are grouped by theme in
//! `qmp/`; `external` drives the server with QEMU's Python library and with `ncat`.

#[path = "qmp/commands.rs"]
mod commands;
mod common;
#[path = "qmp/external.rs"]
mod external;
#[path = "qmp/protocol.rs"]
mod protocol;
#[path = "qmp/sessions.rs"]
mod sessions;
#[path = "qmp/support.rs"]
mod support;
