//! Two hosts: the source and the destination run in two network namespaces joined by a veth
//! pair, and the guest migrates over TCP between the namespaces' own addresses (StratoVirt's
//! "TCP mode supports different host OS").
//!
//! Needs `ip` (iproute2) and the right to create network namespaces (root). Without `ip`, or
//! without that right, the test says loudly that it was skipped; under `CI=true` it fails.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{kvm_available, kvm_lock, scratch, Ferry};
use ferry::guest::pattern::check_dump;
use ferry::guest::{last_sweep, slices_by_cpu, GuestLine};
use serde_json::{json, Value};

const MEM_MIB: u64 = 64;
/// Addresses from the documentation range (RFC 5737), configured only inside our namespaces.
const SOURCE_ADDR: &str = "192.0.2.1";
const DESTINATION_ADDR: &str = "192.0.2.2";
const PREFIX_LEN: u8 = 24;
const SOURCE_VETH: &str = "veth-ferry-a";
const DESTINATION_VETH: &str = "veth-ferry-b";
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `ip ARGS`, returning its stdout, or a message with its stderr.
fn ip(args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run `ip {}`: {error}", args.join(" ")))?;
    if !output.status.success() {
        return Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Under `CI=true` a missing prerequisite fails the test; elsewhere the test says loudly that
/// it was skipped.
fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}, and CI=true requires the two-host test to run");
    }
    eprintln!("SKIPPED: {why}; the two-host migration test did not run");
}

/// Whether `ip` (iproute2) can be run.
fn ip_available() -> bool {
    match ip(&["-V"]) {
        Ok(_) => true,
        Err(error) => {
            skip_or_fail(&format!("iproute2's `ip` is missing ({error})"));
            false
        }
    }
}

/// Two network namespaces joined by a veth pair, each end with its own address; removed on
/// drop, also when the test panics. Deleting a namespace destroys the veth end in it and with
/// it the pair.
struct TwoHosts {
    source: String,
    destination: String,
}

impl TwoHosts {
    fn create() -> Result<Self, String> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let hosts = Self {
            source: format!("ferry-a-{pid}"),
            destination: format!("ferry-b-{pid}"),
        };
        let (a, b) = (hosts.source.as_str(), hosts.destination.as_str());
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        // Both ends are created inside the namespaces: the root namespace never sees them.
        ip(&[
            "link",
            "add",
            SOURCE_VETH,
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            DESTINATION_VETH,
            "netns",
            b,
        ])?;
        for (ns, veth, addr) in [
            (a, SOURCE_VETH, SOURCE_ADDR),
            (b, DESTINATION_VETH, DESTINATION_ADDR),
        ] {
            let cidr = format!("{addr}/{PREFIX_LEN}");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", veth])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
        }
        Ok(hosts)
    }

    /// Starts ferry inside namespace `ns` through `ip netns exec` (which execs ferry in place,
    /// so the harness's process is ferry itself). The QMP socket is a file, reachable from here.
    fn start(&self, ns: &str, name: &str, args: &[&str], qmp: &Path) -> Ferry {
        let mut full = vec!["netns", "exec", ns, common::ferry_bin()];
        full.extend_from_slice(args);
        Ferry::start(Path::new("ip"), name, &full, Some(qmp))
    }

    /// Bytes received so far by the destination's veth end.
    fn destination_rx_bytes(&self) -> u64 {
        let text = ip(&[
            "-n",
            &self.destination,
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            DESTINATION_VETH,
        ])
        .expect("the destination's veth statistics");
        let links: Value = serde_json::from_str(&text).expect("`ip -j` prints JSON");
        links[0]["stats64"]["rx"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx bytes in {text}"))
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.source, &self.destination] {
            if let Err(error) = ip(&["netns", "del", ns]) {
                eprintln!("two_hosts: cleaning up: {error}");
            }
        }
    }
}

/// Removes namespaces left by earlier runs of this test that were killed before their guard
/// ran: `ferry-a-PID` and `ferry-b-PID` whose process is gone.
fn remove_stale_namespaces() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix("ferry-a-")
            .or_else(|| name.strip_prefix("ferry-b-"))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            eprintln!("two_hosts: removing the stale namespace {name}");
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A port nobody listens on in the root namespace (so that reaching it there proves nothing).
fn free_port_everywhere() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

/// The source in namespace A migrates a sweeping two-vCPU guest over TCP to the destination in
/// namespace B, which the root namespace cannot reach; the guest runs on in B with its memory
/// intact.
#[test]
fn migration_between_two_network_namespaces_over_tcp() {
    if !kvm_available() || !ip_available() {
        return;
    }
    let _lock = kvm_lock();
    // Declared first, dropped last: the VMs end before their namespaces go.
    let hosts = match TwoHosts::create() {
        Ok(hosts) => hosts,
        Err(error) => {
            skip_or_fail(&format!("cannot build the two network namespaces: {error}"));
            return;
        }
    };
    let dir = scratch();
    let port = free_port_everywhere();
    let uri = format!("tcp:{DESTINATION_ADDR}:{port}");
    let mem = MEM_MIB.to_string();

    let source = hosts.start(
        &hosts.source,
        "source",
        &["-smp", "2", "-m", &mem, "-append", "ferry.tick_ms=50"],
        &dir.path().join("src.qmp"),
    );
    source.wait_ready();
    source.wait_line("sweeps on cpu 1", Duration::from_secs(30), |l| {
        l == "sweep 3 cpu=1"
    });
    let destination = hosts.start(
        &hosts.destination,
        "destination",
        &["-smp", "2", "-m", &mem, "-incoming", &uri],
        &dir.path().join("dst.qmp"),
    );
    assert_eq!(destination.qmp().status(), "inmigrate");

    // The destination listens in B; from the root namespace its address and port lead nowhere
    // (on a host whose own address is 192.0.2.2, to a closed port of the host itself).
    let target: SocketAddr = format!("{DESTINATION_ADDR}:{port}").parse().unwrap();
    if let Ok(stream) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        panic!(
            "the root namespace reached the destination at {target} ({stream:?}): it is not \
             isolated in its namespace"
        );
    }

    let rx_before = hosts.destination_rx_bytes();
    let mut qmp = source.qmp();
    assert_eq!(qmp.ok("migrate", Some(json!({"uri": uri}))), json!({}));
    let info = qmp.wait_migration(&["completed", "failed", "canceled"], MIGRATION_TIMEOUT);
    assert_eq!(
        info["status"],
        "completed",
        "{info}\n{}\n{}",
        source.context(),
        destination.context()
    );
    let transferred = info["ram"]["transferred"].as_u64().unwrap();
    let rx = hosts.destination_rx_bytes() - rx_before;
    assert!(
        rx >= transferred,
        "the destination's veth received {rx} bytes, less than the {transferred} the source sent"
    );
    eprintln!(
        "two_hosts: {} -> {}: {transferred} bytes sent, {rx} received on {DESTINATION_VETH}, \
         total {} ms, downtime {} ms",
        hosts.source, hosts.destination, info["total-time"], info["downtime"]
    );
    assert_eq!(qmp.status(), "postmigrate");
    assert_eq!(destination.qmp().status(), "running");

    // The guest goes on in B: every vCPU sweeps past where it was on the source.
    let source_lines = source.guest_lines();
    for cpu in 0..2u32 {
        let next = last_sweep(&source_lines, cpu) + 2;
        let what = format!("sweep {next} of cpu {cpu} on the destination");
        destination.wait_line(&what, Duration::from_secs(30), |l| {
            matches!(GuestLine::parse(l), GuestLine::Sweep { n, cpu: c } if c == cpu && n >= next)
        });
    }

    // Its memory is intact: with the vCPUs stopped, each one's slices show the sweep pattern.
    let mut control = destination.qmp();
    control.ok("stop", None);
    let dump_path = dir.path().join("dst.mem");
    control.ok(
        "pmemsave",
        Some(json!({"val": 0, "size": MEM_MIB << 20, "filename": dump_path})),
    );
    let memory = std::fs::read(&dump_path).unwrap();
    let slices = slices_by_cpu(&source_lines);
    assert_eq!(
        slices.len(),
        2,
        "the source printed no slices for both vCPUs"
    );
    for (cpu, slices) in slices {
        if let Err(error) = check_dump(&memory, &slices) {
            panic!("cpu {cpu}: sweep pattern broken on the destination: {error}");
        }
    }
    let bad: Vec<GuestLine> = destination
        .guest_lines()
        .into_iter()
        .filter(|l| matches!(l, GuestLine::TscBackwards { .. } | GuestLine::Fatal(_)))
        .collect();
    assert!(bad.is_empty(), "destination: {bad:?}");

    let mut vms = [source, destination];
    for vm in &mut vms {
        let _ = vm.qmp().execute("quit", None);
        vm.wait_exit(Duration::from_secs(10));
    }
}
