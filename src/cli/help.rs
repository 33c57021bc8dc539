//! The text `-help` (and `-device help`) prints.

use super::{DEFAULT_MEM_MIB, MAX_NUM_QUEUES, MAX_SERIAL_BYTES};

/// The text of `-help`.
pub fn help_text() -> String {
    format!(
        "\
ferry {version}: a KVM virtual machine monitor built around live migration

usage: ferry [options]

  -machine q35           machine type (q35 is the only one and the default)
  -m SIZE                guest RAM: MiB, or with a suffix (512, 512M, 2G); default {mem}
  -mem-prealloc          back all guest RAM with host memory at startup: a host short of
                         memory fails then rather than later, and a migration destination
                         lands pages without faulting memory in (but migrating such a VM
                         out reads all its RAM: no page is known untouched)
  -smp N                 number of vCPUs (1 up to what KVM allows); default 1
  -kernel PATH           ELF vmlinux (PVH entry used when present) or bzImage;
                         without it ferry boots its built-in test guest
  -initrd PATH           initial ramdisk for -kernel
  -append CMDLINE        kernel command line
  -serial stdio|file:PATH|none
                         where the guest's serial port (ttyS0) goes; default stdio
  -name NAME             VM name, reported by QMP query-name
  -S                     do not start the vCPUs until QMP 'cont'
  -qmp unix:PATH,server,nowait
                         QMP control socket
  -incoming tcp:IP:PORT|unix:PATH|defer
                         wait for a live migration instead of booting
  -drive file=PATH,id=ID[,readonly=on|off][,direct=on|off][,format=raw][,if=none]
                         a raw disk image for a -device (write a comma in PATH as ',,');
                         direct=on opens it O_DIRECT; the default, off, goes through the
                         host page cache like QEMU's cache=writeback. aio=threads|off is
                         accepted (each disk does blocking I/O on its own thread)
  -device virtio-blk-pci,drive=ID,addr=SLOT[.FN][,id=ID][,bus=pcie.0][,serial=S]
                       [,num-queues=N][,multifunction=on|off]
                         a virtio disk on pcie.0 at SLOT 0x1..0x1f, function 0..7, in hex
                         (0x3, 0x1f.1; write 0x10, not the ambiguous 10); id defaults to
                         virtio-blk-SS.F; serial up to {serial} bytes; num-queues 1..{queues},
                         default 1. -device help shows this text
  -h, -help              this text
  -version               the version

Booleans take on/off, true/false or yes/no.
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=ferry=debug) to see more.
",
        version = env!("CARGO_PKG_VERSION"),
        mem = DEFAULT_MEM_MIB,
        serial = MAX_SERIAL_BYTES,
        queues = MAX_NUM_QUEUES,
    )
}
