//! Start-up and teardown around the VM owner: build the machine, open the QMP socket, hand the
//! console to the guest, run, and put everything back.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
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
            let server = spawn_qmp_server(listener, handle.clone(), shutdown.clone())
                .context("cannot start the QMP thread")?;
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

/// Serves QMP on a thread of its own, with a runtime of its own, and says when it has ended.
/// During a migration the main runtime's threads copy guest pages and share the cores with
/// busy vCPUs: a command such as `migrate_cancel` waited for one of them for up to 12 ms. A
/// thread that is idle until a command comes gets a core back at once.
fn spawn_qmp_server(
    listener: std::os::unix::net::UnixListener,
    handle: VmHandle,
    shutdown: CancellationToken,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (ended, server) = oneshot::channel();
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())
                .and_then(|runtime| {
                    runtime
                        .block_on(crate::qmp::serve(listener, handle, shutdown))
                        .map_err(|error| error.to_string())
                });
            if let Err(error) = served {
                tracing::error!(%error, "the QMP server failed");
            }
            let _ = ended.send(());
        })?;
    Ok(server)
}
