//! For `qmp_vm.rs`: starting real ferry processes with QMP, reading what their guests print,
//! outside tools, and bounded child processes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::common::{self, Ferry};

/// RAM of every test VM, in MiB.
pub const MEM_MIB: u64 = 64;
/// A fast tick, so that "the guest runs" is seen within a fraction of a second.
pub const APPEND: &str = "ferry.tick_ms=50";
/// How long the built-in guest may take to boot and print `ready`.
pub const BOOT: Duration = Duration::from_secs(60);
/// How long a running guest may take to print something new.
pub const TICK_WAIT: Duration = Duration::from_secs(10);
/// After a stop: time for lines already written by the guest to reach the test.
pub const DRAIN: Duration = Duration::from_millis(100);
/// How long a paused guest is watched for output.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long a ferry process may take to exit once told to.
pub const EXIT_WAIT: Duration = Duration::from_secs(15);

/// A scratch directory and the VMs of one test.
pub struct World {
    pub dir: tempfile::TempDir,
    counter: u32,
}

impl World {
    pub fn new() -> Self {
        Self {
            dir: common::scratch(),
            counter: 0,
        }
    }

    /// A fresh path in the scratch directory.
    pub fn path(&mut self, stem: &str) -> PathBuf {
        self.counter += 1;
        self.dir.path().join(format!("{stem}{}", self.counter))
    }

    /// Starts ferry with `-smp 2 -m 64 -append ferry.tick_ms=50`, `extra` and a QMP socket.
    pub fn start(&mut self, name: &str, extra: &[&str]) -> Ferry {
        self.start_with(name, APPEND, extra)
    }

    /// Starts ferry with `-smp 2 -m 64 -append APPEND`, `extra` and a QMP socket.
    pub fn start_with(&mut self, name: &str, append: &str, extra: &[&str]) -> Ferry {
        let qmp = self.path(&format!("{name}.qmp"));
        let mem = MEM_MIB.to_string();
        let mut args = vec!["-smp", "2", "-m", &mem, "-append", append];
        args.extend_from_slice(extra);
        common::start(name, &args, Some(&qmp))
    }

    /// A running built-in guest that has printed `ready` and ticked on both vCPUs.
    pub fn running(&mut self, name: &str, extra: &[&str]) -> Ferry {
        let vm = self.start(name, extra);
        vm.wait_line("guest 'ready'", BOOT, |l| l == "ready");
        for cpu in 0..2 {
            let tick = format!("tick 2 cpu={cpu}");
            vm.wait_line(&tick, TICK_WAIT, |l| l == tick);
        }
        vm
    }
}

/// A QMP session to `vm`.
pub fn connect(vm: &Ferry, name: &str) -> Client {
    let path = vm.qmp_path.as_deref().expect("started with QMP");
    Client::connect(path, name)
}

/// The guest prints something new (a tick at the latest) within [`TICK_WAIT`].
pub fn assert_runs(vm: &Ferry, when: &str) {
    let seen = vm.line_count();
    vm.wait_line_from(seen, &format!("a tick {when}"), TICK_WAIT, |l| {
        l.starts_with("tick ")
    });
}

/// Waits until the lines the guest wrote before it was paused have reached the test: no new
/// line for [`DRAIN`] (bounded: a guest that keeps printing gives up after two seconds).
pub fn settle(vm: &Ferry) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut seen = vm.line_count();
    while Instant::now() < deadline {
        std::thread::sleep(DRAIN);
        let now = vm.line_count();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// The guest prints nothing at all for [`QUIET`] (once the lines in flight have arrived).
pub fn assert_quiet(vm: &Ferry, when: &str) {
    settle(vm);
    let before = vm.lines();
    std::thread::sleep(QUIET);
    let after = vm.lines();
    assert!(
        after.len() == before.len(),
        "{when}: the guest printed {} lines in {QUIET:?} while it should be paused: {:?}\n{}",
        after.len() - before.len(),
        &after[before.len()..],
        vm.context()
    );
}

/// The last `sweep N cpu=CPU` the guest printed.
pub fn last_sweep(vm: &Ferry, cpu: u32) -> u64 {
    ferry::guest::last_sweep(&vm.guest_lines(), cpu)
}

/// ferry's log has no panic in it.
pub fn assert_no_panic(vm: &Ferry) {
    let stderr = vm.stderr();
    assert!(
        !stderr.contains("panicked"),
        "{}: ferry panicked:\n{stderr}",
        vm.name
    );
}

/// Waits for `vm` to exit and checks that it exited 0 and removed its QMP socket.
pub fn assert_clean_exit(vm: &mut Ferry, what: &str) {
    let status = vm.wait_exit(EXIT_WAIT);
    assert!(
        status.success(),
        "{what}: ferry exited with {status}\n{}",
        vm.context()
    );
    let path = vm.qmp_path.clone().expect("started with QMP");
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{what}: the QMP socket {} is left behind",
        path.display()
    );
    assert_no_panic(vm);
}

/// What a bounded child process did.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` to its end, killing it after `timeout` (a failure).
pub fn run_bounded(mut command: Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = reader(child.stdout.take().expect("piped"));
    let stderr = reader(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} still running after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The file at `path` does not exist.
pub fn assert_absent(path: &Path, what: &str) {
    assert!(
        std::fs::symlink_metadata(path).is_err(),
        "{what}: {} was written",
        path.display()
    );
}
