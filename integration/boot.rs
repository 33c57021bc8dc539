//! Booting: the built-in guest on one and two vCPUs, guest-initiated endings, signals, every
//! command-line error, and Debian's stock kernel.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{kvm_available, kvm_lock, kvm_turn, scratch, Ferry};
use ferry::guest::GuestLine;

/// Ticks, sweeps and TSC checks of a guest that ran for a while.
fn assert_guest_healthy(vm: &Ferry, vcpus: u32) {
    let lines = vm.guest_lines();
    for cpu in 0..vcpus {
        let ticks: Vec<u64> = lines
            .iter()
            .filter_map(|l| match l {
                GuestLine::Tick { n, cpu: c } if *c == cpu => Some(*n),
                _ => None,
            })
            .collect();
        assert!(
            ticks.len() >= 3,
            "cpu {cpu} ticked {} times\n{}",
            ticks.len(),
            vm.context()
        );
        assert!(
            ticks.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu {cpu} ticks skip: {ticks:?}"
        );
        let sweeps: Vec<u64> = lines
            .iter()
            .filter_map(|l| match l {
                GuestLine::Sweep { n, cpu: c } if *c == cpu => Some(*n),
                _ => None,
            })
            .collect();
        assert!(
            sweeps.len() >= 2,
            "cpu {cpu} swept {} times\n{}",
            sweeps.len(),
            vm.context()
        );
        assert!(
            sweeps.windows(2).all(|w| w[1] > w[0]),
            "cpu {cpu} sweeps go backwards: {sweeps:?}"
        );
    }
    let problems: Vec<&GuestLine> = lines
        .iter()
        .filter(|l| matches!(l, GuestLine::TscBackwards { .. } | GuestLine::Fatal(_)))
        .collect();
    assert!(
        problems.is_empty(),
        "guest reported {problems:?}\n{}",
        vm.context()
    );
}

fn boots_builtin_guest(vcpus: u32) {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let smp = vcpus.to_string();
    let vm = common::start(
        "guest",
        &["-smp", &smp, "-m", "256", "-append", "ferry.tick_ms=100"],
        None,
    );
    vm.wait_ready();
    let banner = vm.guest_lines().into_iter().find_map(|l| match l {
        GuestLine::Banner { cpus, ram, .. } => Some((cpus, ram)),
        _ => None,
    });
    let (cpus, ram) = banner.unwrap_or_else(|| panic!("no banner\n{}", vm.context()));
    assert_eq!(cpus, vcpus, "{}", vm.context());
    // The guest counts usable RAM from the memory map: all of -m but the BIOS holes.
    assert!(
        ram > (255 << 20) && ram <= 256 << 20,
        "guest saw {ram} bytes of RAM"
    );
    for cpu in 0..vcpus {
        let what = format!("tick 4 of cpu {cpu}");
        vm.wait_line(&what, Duration::from_secs(30), |l| {
            l == format!("tick 4 cpu={cpu}")
        });
        let what = format!("sweep 2 of cpu {cpu}");
        vm.wait_line(&what, Duration::from_secs(30), |l| {
            l == format!("sweep 2 cpu={cpu}")
        });
    }
    assert_guest_healthy(&vm, vcpus);
}

#[test]
fn builtin_guest_runs_on_one_vcpu() {
    boots_builtin_guest(1);
}

#[test]
fn builtin_guest_runs_on_two_vcpus() {
    boots_builtin_guest(2);
}

/// CPU time (user + system, in clock ticks) that process `pid` has used so far.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// With `ferry.idle=hlt` an idle guest halts its vCPUs between ticks: both keep ticking, and
/// the VM uses a fraction of a core instead of the two a spinning guest takes.
#[test]
fn an_idle_guest_that_halts_leaves_the_host_idle() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let append = "ferry.run=tick ferry.tick_ms=100 ferry.idle=hlt";
    let vm = common::start("idle", &["-smp", "2", "-append", append], None);
    for cpu in 0..2 {
        let tick = format!("tick 3 cpu={cpu}");
        vm.wait_line(&tick, Duration::from_secs(30), |l| l == tick);
    }
    let before = cpu_ticks(vm.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(vm.pid()) - before;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        used * 2 < per_second,
        "the idle guest used {used} of {per_second} clock ticks in one second\n{}",
        vm.context()
    );
    for cpu in 0..2 {
        let tick = format!("tick 12 cpu={cpu}");
        vm.wait_line(&tick, Duration::from_secs(30), |l| l == tick);
    }
    assert!(
        !vm.lines().iter().any(|l| l.starts_with("fatal")),
        "{}",
        vm.context()
    );
}

#[test]
fn guest_reset_triple_fault_and_power_off_end_the_vm_cleanly() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    for (action, line) in [
        ("reset", "resetting"),
        ("triplefault", "triple-faulting"),
        ("poweroff", "powering off through port 0x600"),
    ] {
        let append = format!("ferry.run={action}");
        let mut vm = common::start(action, &["-append", &append], None);
        let status = vm.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "{action}: exit {status}\n{}",
            vm.context()
        );
        assert!(
            vm.lines().iter().any(|l| l == line),
            "{action}: no '{line}'\n{}",
            vm.context()
        );
    }
}

#[test]
fn signals_end_the_vm_with_status_zero() {
    let Some(_lock) = kvm_turn() else {
        return;
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let mut vm = common::start(
            "signal",
            &["-append", "ferry.run=tick ferry.tick_ms=50"],
            None,
        );
        vm.wait_line("a tick", Duration::from_secs(30), |l| {
            l.starts_with("tick ")
        });
        vm.signal(signal);
        let status = vm.wait_exit(Duration::from_secs(10));
        assert!(
            status.success(),
            "signal {signal}: exit {status}\n{}",
            vm.context()
        );
    }
}

#[test]
fn bad_input_gets_one_clear_line_and_the_right_status() {
    let dir = scratch();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let garbage = garbage.to_str().unwrap();
    // A kernel that loads, to reach the initrd checks.
    let kernel = dir.path().join("guest.elf");
    std::fs::write(&kernel, ferry::guest::BUILTIN_GUEST).unwrap();
    let kernel = kernel.to_str().unwrap();
    let unreadable = dir.path().join("unreadable-initrd");
    std::fs::create_dir(&unreadable).unwrap();
    let unreadable = unreadable.to_str().unwrap();
    let kvm = kvm_available();
    // (arguments, exit status, what stderr must say)
    let mut cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["-bogus"], 2, "-bogus: unknown option"),
        (vec!["-m"], 2, "-m: missing value"),
        (vec!["-m", "lots"], 2, "-m: bad size 'lots'"),
        (vec!["-m", "1M"], 2, "-m: 1M is too small"),
        (
            vec!["-smp", "0"],
            2,
            "-smp: the vCPU count must be at least 1",
        ),
        (vec!["-smp", "x"], 2, "-smp: bad vCPU count 'x'"),
        (
            vec!["-machine", "pc"],
            2,
            "-machine: unsupported machine type 'pc' (supported: q35)",
        ),
        (
            vec!["-serial", "pty"],
            2,
            "-serial: unsupported serial backend 'pty'",
        ),
        (
            vec!["-incoming", "tcp:nowhere"],
            2,
            "-incoming: invalid migration URI",
        ),
        (vec!["-qmp", "tcp:1:2"], 2, "-qmp"),
    ];
    if kvm {
        cases.extend([
            (
                vec!["-smp", "100000"],
                2,
                "-smp: 100000 vCPUs requested, but at most",
            ),
            (
                vec!["-kernel", "/nonexistent/vmlinux"],
                1,
                "-kernel: cannot open /nonexistent/vmlinux",
            ),
            (
                vec!["-kernel", garbage],
                1,
                "is neither an ELF vmlinux nor a bzImage",
            ),
            (
                vec!["-kernel", kernel, "-initrd", "/nonexistent/initrd"],
                1,
                "-initrd: cannot read /nonexistent/initrd",
            ),
            (
                vec!["-kernel", kernel, "-initrd", unreadable],
                1,
                "-initrd: cannot read",
            ),
            (
                vec!["-m", "100000G"],
                1,
                "-m: 102400000 MiB of guest RAM is more than this host's",
            ),
            (
                vec!["-m", "1000000G"],
                1,
                "-m: 1024000000 MiB of guest RAM is more than this host's",
            ),
        ]);
    }
    let _lock = kvm_lock();
    for (args, code, message) in cases {
        let output = Command::new(common::ferry_bin())
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{args:?}: stderr {stderr:?} lacks {message:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let lines = stderr.lines().filter(|l| l.starts_with("ferry:")).count();
        assert_eq!(lines, 1, "{args:?}: expected one error line: {stderr}");
    }
}

#[test]
fn help_and_version() {
    let help = Command::new(common::ferry_bin())
        .arg("-help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for option in [
        "-machine",
        "-m SIZE",
        "-smp",
        "-kernel",
        "-qmp",
        "-incoming",
        "-serial",
    ] {
        assert!(text.contains(option), "-help does not mention {option}");
    }
    let version = Command::new(common::ferry_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Debian's kernel (fetched and cached on first use): the ELF vmlinux and the bzImage.
fn debian_kernel() -> (String, String) {
    static KERNEL: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    KERNEL.get_or_init(fetch_debian_kernel).clone()
}

fn fetch_debian_kernel() -> (String, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/integration/support/debian-vmlinux.sh"
    );
    let cache = common::cache_dir().join("debian-kernel");
    let fetched = Command::new("bash")
        .arg(script)
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        fetched.status.success(),
        "fetching Debian's kernel failed: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let vmlinux = String::from_utf8(fetched.stdout).unwrap().trim().to_owned();
    let bzimage = cache.join("vmlinuz").display().to_string();
    (vmlinux, bzimage)
}

/// The bzImage goes through the Linux 64-bit boot protocol and its decompressor runs: Debian
/// builds it without verbose boot, so it prints nothing before the decompressed kernel starts
/// (minutes under this host's ring-0 emulation); instead, after a while the vCPU must be
/// executing the decompressor where it relocated itself, far above the 1 MiB load address.
#[test]
fn debian_bzimage_runs_its_decompressor() {
    if !kvm_available() {
        return;
    }
    let (_, bzimage) = debian_kernel();
    let _lock = kvm_lock();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0";
    let args = ["-m", "512", "-kernel", &bzimage, "-append", cmdline];
    let binary = std::path::Path::new(common::ferry_bin());
    let mut vm = Ferry::start_logging(binary, "bzimage", &args, None, "ferry=debug");
    std::thread::sleep(Duration::from_secs(8));
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", vm.context());
    let log = vm.stderr();
    assert!(log.contains("Linux 64-bit boot"), "{log}");
    let rip = log
        .lines()
        .find(|l| l.contains("vCPU thread finished"))
        .and_then(|l| l.split("rip=0x").nth(1))
        .and_then(|r| u64::from_str_radix(r.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no final vCPU state in the log:\n{log}"));
    assert!(
        rip > 0x100_0000,
        "the decompressor never left its load address: rip {rip:#x}"
    );
}

/// Debian's stock kernel, booted through its PVH entry, prints its banner, exactly the
/// command line ferry passed, and an e820 map that matches -m.
#[test]
fn debian_kernel_prints_banner_cmdline_and_e820() {
    if !kvm_available() {
        return;
    }
    let (vmlinux, _) = debian_kernel();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 panic=-1 reboot=k noxsave";
    let _lock = kvm_lock();
    let vm = common::start(
        "linux",
        &["-m", "512", "-kernel", &vmlinux, "-append", cmdline],
        None,
    );
    let timeout = Duration::from_secs(120);
    vm.wait_line("the kernel banner", timeout, |l| {
        l.contains("Linux version")
    });
    let expected = format!("Command line: {cmdline}");
    vm.wait_line("the command line", timeout, |l| l.ends_with(&expected));
    vm.wait_line("the end of the e820 map", timeout, |l| {
        l.contains("printk: bootconsole")
    });
    let e820: Vec<String> = vm
        .lines()
        .into_iter()
        .filter(|l| l.contains("BIOS-e820:"))
        .collect();
    let usable: Vec<&String> = e820.iter().filter(|l| l.ends_with("usable")).collect();
    assert_eq!(usable.len(), 2, "{e820:#?}");
    assert!(
        usable[0].contains("[mem 0x0000000000000000-0x000000000009fbff]"),
        "{e820:#?}"
    );
    assert!(
        usable[1].contains("[mem 0x0000000000100000-0x000000001fffffff]"),
        "{e820:#?}"
    );
}

/// Keyboard input reaches the guest: what ferry reads on stdin, the guest's UART receives
/// (the `echo` workload prints every line it got).
#[test]
fn serial_input_reaches_the_guest() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let mut child = Command::new(common::ferry_bin())
        .args(["-append", "ferry.run=echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |wanted: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == wanted => return,
                Ok(_) => continue,
                Err(_) => panic!("the guest never printed {wanted:?}"),
            }
        }
    };
    wait_for("ready");
    stdin.write_all(b"hello ferry\nsecond line\n").unwrap();
    stdin.flush().unwrap();
    wait_for("echo: hello ferry");
    wait_for("echo: second line");
    let _ = child.kill();
    let _ = child.wait();
}

/// Debian's kernel finds ferry's ACPI tables through the RSDP address PVH hands it: its early
/// table listing names every table, it takes the vCPUs and the IOAPIC from the MADT, and
/// nothing it prints about the firmware is a complaint. Linux checks table checksums this early
/// only when told to.
///
/// The ACPI interpreter (the DSDT), PCI and MMCONFIG come after the kernel's int3 self-test,
/// which this host's PVM cannot emulate; see `debian_kernel_prints_banner_cmdline_and_e820`.
#[test]
fn debian_kernel_reads_the_acpi_tables() {
    if !kvm_available() {
        return;
    }
    let (vmlinux, _) = debian_kernel();
    let cmdline =
        "console=ttyS0 earlyprintk=ttyS0 panic=-1 reboot=k noxsave acpi_force_table_verification";
    let _lock = kvm_lock();
    let vm = common::start(
        "acpi",
        &[
            "-m", "512", "-smp", "2", "-kernel", &vmlinux, "-append", cmdline,
        ],
        None,
    );
    let timeout = Duration::from_secs(120);
    let rsdp = vm.wait_line("the RSDP in the ACPI table listing", timeout, |l| {
        l.contains("ACPI: RSDP 0x")
    });
    assert!(rsdp.contains("ACPI: RSDP 0x00000000000E0000"), "{rsdp}");
    vm.wait_line("the SMP configuration from the MADT", timeout, |l| {
        l.contains("smpboot: Allowing")
    });
    let lines = vm.lines();
    let context = vm.context();
    for table in ["XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        let listed = format!("ACPI: {table} 0x");
        assert!(
            lines.iter().any(|l| l.contains(&listed)),
            "no {table} in the table listing\n{context}"
        );
    }
    let has = |wanted: &str| lines.iter().any(|l| l.contains(wanted));
    assert!(
        has("ACPI: Using ACPI (MADT) for SMP configuration information"),
        "{context}"
    );
    assert!(has("smpboot: Allowing 2 CPUs, 0 hotplug CPUs"), "{context}");
    assert!(
        has("IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23"),
        "{context}"
    );
    assert!(
        has("BIOS-e820: [mem 0x00000000b0000000-0x00000000bfffffff] reserved"),
        "the ECAM is reserved\n{context}"
    );
    assert!(
        has("ACPI: Early table checksum verification enabled"),
        "{context}"
    );
    let complaints = [
        "ACPI BIOS Error",
        "ACPI BIOS Warning",
        "ACPI Error",
        "ACPI Warning",
        "[Firmware Bug]",
        "ACPI: Unable",
        "No valid RSDP",
    ];
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| {
            complaints.iter().any(|c| l.contains(c))
                || (l.to_lowercase().contains("checksum") && !l.contains("checksum verification"))
        })
        .collect();
    assert!(bad.is_empty(), "the kernel complained: {bad:#?}");
}

/// A fresh VM's legacy PICs are masked once ferry has set it up for the ACPI tables'
/// hardware-reduced platform, so no GSI below 16 reaches a vCPU through LINT0's ExtINT.
#[test]
fn legacy_pics_start_masked() {
    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
    let Some(_lock) = kvm_turn() else {
        return;
    };
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let imr = |chip_id| {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: KVM filled the PIC member of the union for a PIC chip id.
        unsafe { chip.chip.pic.imr }
    };
    assert_eq!(imr(KVM_IRQCHIP_PIC_MASTER), 0, "KVM's PICs start unmasked");
    ferry::machine::acpi::mask_legacy_pics(&vm).unwrap();
    assert_eq!(imr(KVM_IRQCHIP_PIC_MASTER), 0xff);
    assert_eq!(imr(KVM_IRQCHIP_PIC_SLAVE), 0xff);
}
