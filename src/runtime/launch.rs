//! Start-up and teardown around the VM owner: build the machine, open the QMP socket, hand the
//! console to the guest, run, and put everything back.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::console::{spawn_stdin_reader, RawTerminal};
use super::control::VmHandle;
use super::vcpu::install_kick_handler;
use super::vmm::{Ending, Vmm};
use super::GuestEvents;
use crate::cli::{Config, SerialTarget};
use crate::machine::Machine;
use crate::migrate::transport::Listener;
use crate::migrate::uri::Incoming;

/// How long QMP sessions get to flush their last replies and events at shutdown.
const QMP_DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// Runs the VM that `config` describes until it ends, and says how ferry should exit.
pub async fn launch(config: Config) -> anyhow::Result<ExitCode> {
    install_kick_handler()?;
    let (guest_tx, guest_rx) = GuestEvents::channel();
    let machine = match Machine::new(&config, guest_tx, config.incoming.is_none()) {
        Ok(machine) => machine,
        Err(error) if error.is_usage() => {
            eprintln!("ferry: {error}");
            return Ok(ExitCode::from(2));
        }
        Err(error) => return Err(error.into()),
    };
    tracing::info!(
        vcpus = config.vcpus,
        mem_mib = config.mem_bytes >> 20,
        machine = config.machine.name(),
        "VM created"
    );
    // Listen before QMP comes up, so that a client that sees the QMP socket can start the
    // source's migration right away.
    let incoming = match &config.incoming {
        None => None,
        Some(Incoming::Defer) => Some(None),
        Some(Incoming::Listen(uri)) => {
            Some(Some(Listener::bind(uri).await.with_context(|| {
                format!("-incoming: cannot listen on {uri}")
            })?))
        }
    };
    let shutdown = CancellationToken::new();
    let (handle, requests) = VmHandle::new(config.name.clone());
    let qmp = match &config.qmp {
        Some(path) => {
            let socket = crate::qmp::bind(path).with_context(|| "-qmp".to_string())?;
            let (listener, guard) = socket.into_parts();
            let server = tokio::spawn(crate::qmp::serve(
                listener,
                handle.clone(),
                shutdown.clone(),
            ));
            Some((server, guard))
        }
        None => None,
    };
    let _terminal = match config.serial {
        SerialTarget::Stdio => {
            spawn_stdin_reader(machine.devices.clone());
            RawTerminal::enter()
        }
        _ => None,
    };
    let vmm = Vmm::new(machine, &config, handle, shutdown.clone())?;
    let ending = vmm.run(requests, guest_rx, incoming).await;
    shutdown.cancel();
    if let Some((server, _guard)) = qmp {
        if tokio::time::timeout(QMP_DRAIN_DEADLINE, server)
            .await
            .is_err()
        {
            tracing::warn!("QMP sessions did not close in time");
        }
    }
    match ending? {
        Ending::Clean => Ok(ExitCode::SUCCESS),
        Ending::Failed(reason) => {
            eprintln!("ferry: {reason}");
            Ok(ExitCode::from(1))
        }
    }
}
