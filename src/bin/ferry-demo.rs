//! ferry's main job, shown on the built-in guest: a live migration from one ferry process to
//! another while the guest sweeps its memory and ticks, with the progress and the result.
//!
//! usage: `ferry-demo [tcp|unix] [MEM_MIB]`
#![expect(
    clippy::print_stdout,
    reason = "the demo talks to the person who runs it"
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry::guest::GuestLine;
use ferry::harness::Ferry;
use serde_json::json;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-demo: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// The `ferry` binary next to this one (cargo builds both into the same directory).
fn ferry_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let ferry = me.with_file_name("ferry");
    if !ferry.exists() {
        bail!(
            "{} is missing; build it first with `cargo build --release`",
            ferry.display()
        );
    }
    Ok(ferry)
}

fn last_tick(lines: &[GuestLine]) -> Option<u64> {
    lines.iter().rev().find_map(|l| match l {
        GuestLine::Tick { n, cpu: 0 } => Some(*n),
        _ => None,
    })
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let transport = args.next().unwrap_or_else(|| "unix".into());
    let mem: u64 = args
        .next()
        .map_or(Ok(512), |m| m.parse())
        .context("MEM_MIB must be a number")?;
    let binary = ferry_binary()?;
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    let uri = match transport.as_str() {
        "unix" => format!("unix:{}", dir.path().join("migration.sock").display()),
        "tcp" => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            format!("tcp:127.0.0.1:{port}")
        }
        other => bail!("unknown transport '{other}' (tcp or unix)"),
    };
    let mem_arg = mem.to_string();
    let guest = ["-smp", "2", "-m", &mem_arg];
    let qmp = |name: &str| dir.path().join(name);

    println!(
        "Starting the source: ferry {} -append ferry.tick_ms=200",
        guest.join(" ")
    );
    let mut source_args = guest.to_vec();
    source_args.extend(["-append", "ferry.tick_ms=200"]);
    let source = Ferry::start(&binary, "source", &source_args, Some(&qmp("source.qmp")));
    source.wait_line("the guest to start", Duration::from_secs(60), |l| {
        l == "sweep 3 cpu=1"
    });
    println!("  the guest runs: both vCPUs sweep {mem} MiB of RAM and tick every 200 ms");

    println!(
        "Starting the destination: ferry {} -incoming {uri}",
        guest.join(" ")
    );
    let mut destination_args = guest.to_vec();
    destination_args.extend(["-incoming", &uri]);
    let destination = Ferry::start(
        &binary,
        "destination",
        &destination_args,
        Some(&qmp("dest.qmp")),
    );

    println!("Migrating: {{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"{uri}\"}}}}");
    let mut control = source.qmp();
    control.ok("migrate", Some(json!({"uri": uri})));
    let started = Instant::now();
    let info = loop {
        let info = control.ok("query-migrate", None);
        let status = info["status"].as_str().unwrap_or("?").to_owned();
        let ram = &info["ram"];
        let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            "  {:6.2} s  {:<9}  pass {:>2}  sent {:8.1} MiB  remaining {:7.1} MiB  {:7.0} Mbit/s",
            started.elapsed().as_secs_f64(),
            status,
            ram["dirty-sync-count"].as_u64().unwrap_or(0),
            mib(&ram["transferred"]),
            mib(&ram["remaining"]),
            ram["mbps"].as_f64().unwrap_or(0.0),
        );
        if !matches!(status.as_str(), "setup" | "active") {
            break info;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if info["status"] != "completed" {
        bail!(
            "the migration ended {}: {}",
            info["status"],
            info["error-desc"]
        );
    }
    let before = last_tick(&source.guest_lines()).unwrap_or(0);
    let seen = destination.line_count();
    destination.wait_line_from(
        seen,
        "the guest on the destination",
        Duration::from_secs(30),
        |l| l.starts_with("tick ") && l.ends_with("cpu=0"),
    );
    let after = destination
        .guest_lines()
        .iter()
        .find_map(|l| match l {
            GuestLine::Tick { n, cpu: 0 } => Some(*n),
            _ => None,
        })
        .unwrap_or(0);
    println!(
        "Completed in {} ms with {} ms of downtime; {:.1} MiB went over the {transport} socket.",
        info["total-time"],
        info["downtime"],
        info["ram"]["transferred"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    println!(
        "  source: {}; destination: {}",
        control.status(),
        destination.qmp().status()
    );
    println!(
        "  the guest's last tick on the source was {before}, its first on the destination {after}"
    );
    for vm in [&source, &destination] {
        let _ = vm.qmp().execute("quit", None);
    }
    wait_gone(dir.path());
    Ok(())
}

/// Gives both processes a moment to remove their sockets before the directory goes.
fn wait_gone(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
