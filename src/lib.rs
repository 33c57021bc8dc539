//! ferry: a KVM virtual machine monitor whose headline feature is live migration.
pub mod block;
pub mod cli;
pub mod guest;
pub mod harness;
pub mod machine;
pub mod migrate;
pub mod qmp;
pub mod runtime;
