//! Builds the built-in guest program (`guest/`) into `$OUT_DIR/ferry-guest.elf`.
//!
//! The guest is freestanding C plus GNU assembler, compiled with the system C
//! compiler and linked with GNU ld (both from the ordinary gcc/binutils
//! packages). Override the tools with `FERRY_GUEST_CC`, `FERRY_GUEST_LD` and
//! `FERRY_GUEST_OBJDUMP`.
//!
//! After linking, the image is disassembled and rejected if it contains an
//! instruction that KVM's instruction emulator does not implement: on this
//! project's PVM host all ring-0 guest code runs through that emulator, so such
//! an instruction would stop the guest with an emulation failure.

use std::env;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{exit, Command};

/// Guest sources, compiled in this order.
const SOURCES: &[&str] = &[
    "entry.S",
    "trampoline.S",
    "isr.S",
    "setup.c",
    "smp.c",
    "trap.c",
    "print.c",
    "cmdline.c",
    "user.c",
    "virtio_blk.c",
    "disk.c",
    "lib.c",
];

/// Other inputs: a change to any of them rebuilds the guest.
const OTHER_INPUTS: &[&str] = &["guest.h", "x86.h", "disk.h", "guest.ld"];

/// Flags for every source.
const COMMON_FLAGS: &[&str] = &[
    "-m64",
    "-fno-pic",
    "-fno-pie",
    "-nostdinc",
    "-Wa,--noexecstack",
];

/// Flags for C sources: freestanding, general registers only (no SSE, which
/// the emulator lacks), no red zone (interrupt frames), no stack protector
/// (no TLS), and none of the transformations that can insert `ud2` or calls
/// to the C library.
const C_FLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-march=x86-64",
    "-mtune=generic",
    "-mcmodel=small",
    "-ffreestanding",
    "-fno-builtin",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-mmx",
    "-mno-sse",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-isolate-erroneous-paths-dereference",
    "-fno-isolate-erroneous-paths-attribute",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
];

const LD_FLAGS: &[&str] = &[
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "-z",
    "max-page-size=0x1000",
    "-z",
    "noexecstack",
    "--build-id=none",
];

/// Mnemonics KVM's x86 emulator does not implement (see
/// shared/notes/kvm-host.md §5), plus SSE registers in any instruction.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "int3",
    "ud0",
    "ud1",
    "ud2",
    "popcnt",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "xrstor",
    "xrstors",
    "cmpxchg16b",
    "fwait",
    "wait",
    "clac",
    "stac",
    "endbr64",
    "tzcnt",
    "lzcnt",
];
const FORBIDDEN_OPERANDS: &[&str] = &["%xmm", "%ymm", "%zmm", "%mm", "%st"];

fn main() {
    if let Err(msg) = build() {
        eprintln!("error: building the built-in guest (guest/) failed: {msg}");
        exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let src_dir = manifest_dir.join("guest");
    let obj_dir = out_dir.join("guest-obj");
    std::fs::create_dir_all(&obj_dir)
        .map_err(|e| format!("creating {}: {e}", obj_dir.display()))?;

    println!("cargo:rerun-if-changed=guest");
    for name in SOURCES.iter().chain(OTHER_INPUTS) {
        println!("cargo:rerun-if-changed=guest/{name}");
    }
    let cc = tool("FERRY_GUEST_CC", "cc");
    let ld = tool("FERRY_GUEST_LD", "ld");
    let objdump = tool("FERRY_GUEST_OBJDUMP", "objdump");

    let mut objects = Vec::new();
    for name in SOURCES {
        let src = src_dir.join(name);
        let obj = obj_dir.join(format!("{name}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(COMMON_FLAGS);
        if name.ends_with(".c") {
            cmd.args(C_FLAGS);
        }
        cmd.arg("-I")
            .arg(&src_dir)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj);
        run(&mut cmd, &cc)?;
        objects.push(obj);
    }

    let elf = out_dir.join("ferry-guest.elf");
    let mut cmd = Command::new(&ld);
    cmd.args(LD_FLAGS)
        .arg("-T")
        .arg(src_dir.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .args(&objects);
    run(&mut cmd, &ld)?;

    let listing = run(
        Command::new(&objdump)
            .args(["-d", "--no-show-raw-insn"])
            .arg(&elf),
        &objdump,
    )?;
    check_instructions(&listing)
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}

/// The program named by `var`, or `default`.
fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

/// Runs `cmd` and returns its stdout; compiler warnings become cargo warnings.
fn run(cmd: &mut Command, program: &str) -> Result<String, String> {
    let output = cmd.output().map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            format!(
                "`{program}` not found; install gcc and binutils \
                 (Debian: apt-get install gcc binutils) or point FERRY_GUEST_CC, \
                 FERRY_GUEST_LD and FERRY_GUEST_OBJDUMP at them"
            )
        } else {
            format!("running `{program}`: {e}")
        }
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("{cmd:?} failed ({}):\n{stderr}", output.status));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=guest: {line}");
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Rejects instructions the KVM emulator cannot run (see the module docs).
fn check_instructions(listing: &str) -> Result<(), String> {
    let mut function = "?";
    let mut bad = Vec::new();
    for line in listing.lines() {
        // "0000000000100000 <pvh_entry>:" starts a symbol.
        if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
            function = name.1;
            continue;
        }
        // "  100010:\tmov    %eax,%ds"
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        let mut words = insn.split_whitespace();
        let mut mnemonic = words.next().unwrap_or("");
        while matches!(
            mnemonic,
            "lock" | "rep" | "repz" | "repnz" | "data16" | "cs" | "ds"
        ) {
            mnemonic = words.next().unwrap_or("");
        }
        if FORBIDDEN_MNEMONICS.contains(&mnemonic)
            || FORBIDDEN_OPERANDS.iter().any(|op| insn.contains(op))
        {
            bad.push(format!(
                "  {}: {} (in {function})",
                addr.trim(),
                insn.trim()
            ));
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the guest contains instructions KVM's emulator does not implement:\n{}",
        bad.join("\n")
    ))
}
