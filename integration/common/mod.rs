//! What the integration tests share: starting ferry, reading its guest's serial output, a QMP
//! client, and the rule that KVM tests run one at a time (two cores run everything).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

pub use ferry::harness::Ferry;
use ferry::harness::Qmp;

/// The ferry binary cargo built for these tests.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Whether KVM tests can run. Under `CI=true` a missing `/dev/kvm` fails the test; elsewhere
/// the test says loudly that it was skipped.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("/dev/kvm is missing, and CI=true requires the KVM tests to run");
    }
    eprintln!("SKIPPED: /dev/kvm is missing; this KVM test did not run");
    false
}

/// How a KVM test starts: its turn on KVM ([`kvm_lock`]), or `None` where it is skipped
/// ([`kvm_available`]).
pub fn kvm_turn() -> Option<MutexGuard<'static, ()>> {
    kvm_available().then(kvm_lock)
}

/// Serialises the KVM tests of one test binary: each VM keeps a core busy, and two cores run
/// everything, so tests that overlapped would measure each other.
pub fn kvm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A scratch directory for one test, removed afterwards.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("a temporary directory")
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The two ways ferry migrates on one host.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Tcp,
    Unix,
}

/// A fresh migration URI: a free loopback port, or the UNIX socket `socket`.
pub fn migration_uri(transport: Transport, socket: &Path) -> String {
    match transport {
        Transport::Tcp => format!("tcp:127.0.0.1:{}", free_port()),
        Transport::Unix => format!("unix:{}", socket.display()),
    }
}

/// A cache directory that survives between test runs (for downloads).
pub fn cache_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("FERRY_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache"));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
    .clone()
}

/// Starts the ferry binary cargo built for these tests.
pub fn start(name: &str, args: &[&str], qmp: Option<&Path>) -> Ferry {
    Ferry::start(Path::new(ferry_bin()), name, args, qmp)
}

/// Migrates the source behind `qmp` to a destination that accepts the configuration and then
/// takes every page (answering the source's SYNCs) but never says READY, so the source stays in
/// its switchover for as long as the test likes; or, with `read` false, reads no page data at
/// all, so the source blocks in a socket write (on a page connection, or with `multifd` off on
/// the control one). The destination's thread returns what it heard.
pub fn migrate_to_silent_destination(qmp: &mut Qmp, read: bool) -> std::thread::JoinHandle<Heard> {
    use ferry::migrate::wire::{read_header, read_message, write_message, Message};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        runtime().block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (mut stream, config) = accept_config(&listener).await;
            let mut heard = Heard {
                config: Some(config),
                ..Heard::default()
            };
            write_message(&mut stream, &Message::Accept).await.unwrap();
            let mut next = read_message(&mut stream).await;
            // Page connections, if the source opens any, are taken as the control one is.
            let mut lanes = Vec::new();
            if let Ok(Message::Lanes(offer)) = next {
                for _ in 0..offer.count {
                    let accepted = tokio::time::timeout(CONNECTED, listener.accept()).await;
                    let (mut lane, _) = accepted.expect("a page connection never came").unwrap();
                    read_header(&mut lane).await.unwrap();
                    let hello = read_message(&mut lane).await;
                    assert!(matches!(hello, Ok(Message::Lane(_))), "{hello:?}");
                    if read {
                        tokio::spawn(async move { while read_message(&mut lane).await.is_ok() {} });
                    } else {
                        lanes.push(lane);
                    }
                }
                write_message(&mut stream, &Message::Accept).await.unwrap();
                next = read_message(&mut stream).await;
            }
            for reading in 0..ferry::migrate::clock::PROBES as u64 {
                if reading > 0 {
                    next = read_message(&mut stream).await;
                }
                assert!(matches!(next, Ok(Message::ClockProbe)), "{next:?}");
                write_message(&mut stream, &Message::Clock(reading))
                    .await
                    .unwrap();
            }
            if !read {
                // Round 0's zero runs end with a SYNC before any page data: answer it, so that
                // the source goes on to write pages nobody reads.
                while !matches!(read_message(&mut stream).await, Ok(Message::Sync) | Err(_)) {}
                write_message(&mut stream, &Message::Synced).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                return heard;
            }
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while let Ok(Ok(message)) =
                tokio::time::timeout_at(deadline, read_message(&mut stream)).await
            {
                let answer = match message {
                    Message::Sync => Message::Synced,
                    // The source reads the clock again before its switchover.
                    Message::ClockProbe => Message::Clock(u64::MAX / 2),
                    Message::Error(_) | Message::Cancel => {
                        heard.last_word = Some(message);
                        continue;
                    }
                    Message::State(sections) => {
                        heard.state = Some(sections);
                        continue;
                    }
                    _ => continue,
                };
                write_message(&mut stream, &answer).await.unwrap();
            }
            heard
        })
    });
    qmp.ok(
        "migrate",
        Some(serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")})),
    );
    thread
}

/// How long a test's fake destination waits for a source to connect.
const CONNECTED: Duration = Duration::from_secs(60);

/// Accepts a source's control connection on `listener` and reads its configuration, the
/// first thing a source sends.
pub async fn accept_config(
    listener: &tokio::net::TcpListener,
) -> (
    tokio::net::TcpStream,
    Box<ferry::migrate::state::VmDescription>,
) {
    use ferry::migrate::wire::{read_header, read_message, Message};
    let accepted = tokio::time::timeout(CONNECTED, listener.accept()).await;
    let (mut stream, _) = accepted.expect("the source never connected").unwrap();
    read_header(&mut stream).await.unwrap();
    match read_message(&mut stream).await {
        Ok(Message::Config(config)) => (stream, config),
        other => panic!("the source began with {other:?}, not its configuration"),
    }
}

/// A runtime for a test's fake peer, on the thread that calls it.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a [`migrate_to_silent_destination`]'s destination heard from the source.
#[derive(Debug, Default)]
pub struct Heard {
    pub config: Option<Box<ferry::migrate::state::VmDescription>>,
    pub state: Option<Vec<ferry::migrate::state::Section>>,
    /// Its last word when it gave up (its ERROR or CANCEL), if it said one.
    pub last_word: Option<ferry::migrate::wire::Message>,
}

/// Waits until the source has paused its guest for the switchover.
pub fn wait_switchover(qmp: &mut Qmp, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while qmp.status() != "finish-migrate" {
        assert!(Instant::now() < deadline, "never reached the switchover");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `program args` runs and succeeds. When it does not: under `CI=true` a panic (CI
/// installs it), elsewhere a loud notice on the real stderr and `false`, so the test skips.
pub fn require_tool(program: &str, args: &[&str], install: &str) -> bool {
    let works = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if works {
        return true;
    }
    let message = format!(
        "`{program} {}` failed; install with `{install}`",
        args.join(" ")
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message} (required when CI=true)");
    }
    // libtest captures eprintln!, not direct writes to the stderr handle.
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("\n*** SKIPPED (CI is not true): {message} ***\n"),
    );
    false
}
