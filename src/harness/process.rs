//! A ferry process started by a program (tests, the demo, the benchmark), with its guest's
//! serial output collected line by line and its log kept for error reports.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::qmp::Qmp;
use crate::guest::GuestLine;

/// One running ferry process with its serial output collected line by line.
pub struct Ferry {
    child: Child,
    /// Each serial line with the moment it arrived here.
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stderr: Arc<Mutex<String>>,
    pub qmp_path: Option<PathBuf>,
    pub name: String,
}

impl Ferry {
    /// Starts ferry with `args`; with `qmp` set, adds `-qmp unix:PATH,server,nowait` and waits
    /// until the socket accepts connections.
    pub fn start(binary: &Path, name: &str, args: &[&str], qmp: Option<&Path>) -> Self {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "ferry=info".into());
        Self::start_logging(binary, name, args, qmp, &filter)
    }

    /// Like [`Ferry::start`], with ferry's log filter (`RUST_LOG`) set to `filter`.
    pub fn start_logging(
        binary: &Path,
        name: &str,
        args: &[&str],
        qmp: Option<&Path>,
        filter: &str,
    ) -> Self {
        let mut command = Command::new(binary);
        command.args(args);
        if let Some(path) = qmp {
            command
                .arg("-qmp")
                .arg(format!("unix:{},server,nowait", path.display()));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command.env("RUST_LOG", filter);
        // A test or demo killed outright must not leave VMs running: the kernel kills ferry
        // when the thread that started it dies. (So start ferry from a thread that lives as
        // long as the VM should.)
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command.spawn().expect("ferry starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((Instant::now(), line));
            }
        });
        let err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut text = sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut ferry = Self {
            child,
            lines,
            stderr,
            qmp_path: qmp.map(Path::to_owned),
            name: name.into(),
        };
        if let Some(path) = qmp {
            // A VM started with -mem-prealloc backs all its RAM first: 4.6 s for 4 GiB on this
            // host when its cores are free, twice that when another VM keeps them busy.
            let deadline = Instant::now() + Duration::from_secs(30);
            while UnixStream::connect(path).is_err() {
                if let Some(status) = ferry.exited() {
                    panic!(
                        "{name}: ferry exited ({status}) before its QMP socket appeared\n{}",
                        ferry.stderr()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{name}: QMP socket never appeared\n{}",
                    ferry.stderr()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ferry
    }

    /// How many serial lines have arrived so far (without copying them).
    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// The serial output so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines_from(0)
    }

    /// The serial output from line `skip` on (only those lines are copied).
    pub fn lines_from(&self, skip: usize) -> Vec<String> {
        let lines = self.arrived_from(skip);
        lines.into_iter().map(|(_, line)| line).collect()
    }

    /// Like [`Ferry::lines_from`], each line with the moment it arrived: a program that
    /// reads the guest's output as it comes can place in time what a line reports.
    pub fn arrived_from(&self, skip: usize) -> Vec<(Instant, String)> {
        let lines = self.lines.lock().unwrap();
        lines.get(skip..).map_or_else(Vec::new, <[_]>::to_vec)
    }

    /// Like [`Ferry::arrived_from`], each line parsed as the built-in guest's protocol.
    pub fn arrived_guest_lines_from(&self, skip: usize) -> Vec<(Instant, GuestLine)> {
        let arrived = self.arrived_from(skip);
        arrived
            .into_iter()
            .map(|(at, line)| (at, GuestLine::parse(&line)))
            .collect()
    }

    /// The serial output so far, parsed as the built-in guest's protocol.
    pub fn guest_lines(&self) -> Vec<GuestLine> {
        self.lines().iter().map(|l| GuestLine::parse(l)).collect()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Why a test gave up: the tail of the serial output and ferry's log.
    pub fn context(&self) -> String {
        let lines = self.lines();
        let tail = &lines[lines.len().saturating_sub(15)..];
        format!(
            "--- {} serial (last {} of {} lines) ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail.len(),
            lines.len(),
            tail.join("\n"),
            self.name,
            self.stderr()
        )
    }

    /// Waits until a serial line after the first `skip` lines satisfies `matches`; returns its
    /// index and the line.
    pub fn wait_line_from(
        &self,
        skip: usize,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((index, line)) = self
                .lines_from(skip)
                .into_iter()
                .enumerate()
                .find(|(_, l)| matches(l))
            {
                return (skip + index, line);
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}\n{}",
                self.name,
                self.context()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_line(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line_from(0, what, timeout, matches).1
    }

    /// Waits until the guest has printed `ready`.
    pub fn wait_ready(&self) {
        self.wait_line("guest 'ready'", Duration::from_secs(60), |l| l == "ready");
    }

    /// Opens a QMP session.
    pub fn qmp(&self) -> Qmp {
        let path = self.qmp_path.as_deref().expect("started with QMP");
        match UnixStream::connect(path) {
            Ok(_) => Qmp::connect(path),
            Err(error) => panic!(
                "{}: QMP at {} refuses: {error}\n{}",
                self.name,
                path.display(),
                self.context()
            ),
        }
    }

    /// Waits for the process to end, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: still running after {timeout:?}\n{}",
                self.name,
                self.context()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, once the process has exited (and its last output has been read).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().expect("waitpid")?;
        // Let the reader threads drain what the process wrote last.
        std::thread::sleep(Duration::from_millis(50));
        Some(status)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(self.pid(), signal) };
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("waitpid").is_none()
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
