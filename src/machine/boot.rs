//! Loading a kernel and writing what its boot protocol expects into guest memory.
//!
//! Two protocols, chosen by the image: an ELF that carries a PVH note is entered through PVH
//! (32-bit protected mode, `hvm_start_info` in EBX), as QEMU and Cloud Hypervisor do; any other
//! ELF vmlinux and every bzImage through the Linux 64-bit boot protocol (long mode, `boot_params`
//! in RSI).
//!
//! Low memory used by the boot tables:
//!
//! | range               | what                                   |
//! |---------------------|----------------------------------------|
//! | 0x500..0x540        | GDT (and an empty IDT)                 |
//! | 0x6000..0x7000      | PVH `hvm_start_info`, memmap, modlist  |
//! | 0x7000..0x8000      | Linux `boot_params` (zero page)        |
//! | 0x8000..0x9000      | boot stack                             |
//! | 0x9000..0xc000      | identity page tables (first 1 GiB)     |
//! | 0x20000..0x21000    | kernel command line                    |
//! | 0xe0000..0xf0000    | ACPI tables (see `acpi`)               |
//! | 0xf0000..0x100000   | MP table                               |
//!
//! Both protocols hand the kernel the RSDP's address, so it need not scan for it.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, ReadVolatile};

use super::layout::{ACPI_TABLES_START, PCIE_ECAM_SIZE, PCIE_ECAM_START};
use super::memory::{low_ram_end, GuestMemory, RamRange};

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = 0x6100;
pub const PVH_MODLIST: u64 = 0x6f00;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, NUL included (Linux's COMMAND_LINE_SIZE on x86 is 2048;
/// newer kernels take more, and `cmdline_size` tells them where it ends).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the legacy BIOS area, reserved in the e820 map; the MP table lives in it.
pub const BIOS_AREA_START: u64 = 0xf0000;
/// The extended BIOS data area at the top of conventional memory, reserved like on a PC.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded and where conventional memory ends.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
/// Default `initrd_addr_max` for kernels whose header predates the field.
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit long mode at `entry`, `boot_params` at [`ZERO_PAGE`] in RSI.
    Linux64 { entry: u64 },
    /// 32-bit protected mode at `entry`, `hvm_start_info` at [`PVH_START_INFO`] in EBX.
    Pvh { entry: u64 },
}

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    File(PathBuf),
    /// An image embedded in ferry (the built-in guest).
    Builtin(&'static [u8]),
}

/// Why the kernel could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("-kernel: cannot open {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("-kernel: {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: String },
    #[error("-kernel: cannot load {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("-initrd: cannot read {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("-initrd: {size} bytes do not fit in guest RAM below {limit:#x} after the kernel; give the guest more memory (-m)")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("-append: the command line is {len} bytes; at most {} fit", CMDLINE_MAX - 1)]
    CmdlineTooLong { len: usize },
    #[error("cannot write boot tables into guest memory: {0}")]
    Tables(String),
}

/// Loads the kernel and the initrd, writes the boot tables, and says how to enter the kernel.
/// `rsdp` is the guest-physical address of the ACPI tables' root pointer.
pub fn load(
    memory: &GuestMemory,
    layout: &[RamRange],
    kernel: &KernelImage,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Entry, BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len() });
    }
    let (loaded, label) = match kernel {
        KernelImage::File(path) => {
            let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
                path: path.clone(),
                source,
            })?;
            (
                load_image(memory, &mut file, &path.display().to_string())?,
                path.display(),
            )
        }
        KernelImage::Builtin(bytes) => {
            let label = "the built-in guest";
            (
                load_image(memory, &mut Cursor::new(*bytes), label)?,
                Path::new(label).display(),
            )
        }
    };
    let label = label.to_string();
    let initrd = match initrd {
        Some(path) => Some(load_initrd(memory, layout, &loaded, path)?),
        None => None,
    };
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Tables(e.to_string()))?;

    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_start_info(memory, layout, initrd, rsdp)?;
            tracing::info!(kernel = %label, entry = format_args!("{:#x}", entry.0), "PVH boot");
            Ok(Entry::Pvh {
                entry: entry.raw_value(),
            })
        }
        _ => {
            write_zero_page(memory, layout, loaded.setup_header, initrd, cmdline, rsdp)?;
            let entry = match loaded.setup_header {
                // bzImage: the 64-bit entry is 0x200 past the protected-mode code.
                Some(_) => loaded.kernel_load.raw_value() + 0x200,
                None => loaded.kernel_load.raw_value(),
            };
            tracing::info!(kernel = %label, entry = format_args!("{entry:#x}"), "Linux 64-bit boot");
            Ok(Entry::Linux64 { entry })
        }
    }
}

fn load_image<F>(
    memory: &GuestMemory,
    image: &mut F,
    label: &str,
) -> Result<KernelLoaderResult, BootError>
where
    F: Read + ReadVolatile + Seek,
{
    let start = Some(GuestAddress(HIGH_MEMORY_START));
    match Elf::load(memory, None, image, start) {
        Ok(result) => return Ok(result),
        // Too short for an ELF header, or another magic: maybe a bzImage.
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber
            | linux_loader::loader::elf::Error::ReadElfHeader,
        )) => {}
        Err(error) => {
            return Err(BootError::Load {
                path: label.into(),
                reason: error.to_string(),
            })
        }
    }
    match BzImage::load(memory, None, image, start) {
        Ok(result) => Ok(result),
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage
            | linux_loader::loader::bzimage::Error::ReadBzImageHeader
            | linux_loader::loader::bzimage::Error::SeekBzImageHeader,
        )) => Err(BootError::UnknownFormat { path: label.into() }),
        Err(error) => Err(BootError::Load {
            path: label.into(),
            reason: error.to_string(),
        }),
    }
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
}

fn load_initrd(
    memory: &GuestMemory,
    layout: &[RamRange],
    kernel: &KernelLoaderResult,
    path: &Path,
) -> Result<Initrd, BootError> {
    let read_error = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let addr_max = kernel
        .setup_header
        .map(|hdr| u64::from(hdr.initrd_addr_max))
        .filter(|max| *max != 0)
        .unwrap_or(INITRD_ADDR_MAX_DEFAULT);
    let limit = low_ram_end(layout).min(addr_max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.kernel_end);
    let addr = addr.ok_or(BootError::InitrdTooLarge { size, limit })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_error(std::io::Error::other(e.to_string())))?;
    Ok(Initrd { addr, size })
}

/// The e820 map of a q35 machine with this RAM layout, sorted by address.
///
/// Besides the BIOS holes it reserves the ACPI tables (just below the MP table, so one entry
/// covers both) and the PCIe ECAM: Linux uses an MCFG region only if the firmware reserved it.
pub fn e820_map(layout: &[RamRange]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (
            ACPI_TABLES_START,
            HIGH_MEMORY_START - ACPI_TABLES_START,
            E820_RESERVED,
        ),
        (PCIE_ECAM_START, PCIE_ECAM_SIZE, E820_RESERVED),
    ];
    for range in layout {
        let start = range.start.max(HIGH_MEMORY_START);
        if range.end() > start {
            map.push((start, range.end() - start, E820_RAM));
        }
    }
    map.sort_unstable();
    map
}

fn write_zero_page(
    memory: &GuestMemory,
    layout: &[RamRange],
    header: Option<setup_header>,
    initrd: Option<Initrd>,
    cmdline: &str,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x100_0000;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(layout);
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        memory,
    )
    .map_err(|e| BootError::Tables(e.to_string()))
}

fn write_pvh_start_info(
    memory: &GuestMemory,
    layout: &[RamRange],
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map = e820_map(layout);
    let mut start_info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO));
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        })
        .collect();
    params.set_sections(&entries, GuestAddress(PVH_MEMMAP));
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, memory)
        .map_err(|e| BootError::Tables(e.to_string()))
}

/// Writes page tables that identity-map the first GiB with 2 MiB pages, enough for the Linux
/// 64-bit entry to reach the kernel, the zero page and the command line.
pub fn write_identity_page_tables(memory: &GuestMemory) -> Result<(), BootError> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(|e| BootError::Tables(e.to_string()))
    };
    write(PDPT_START | 0x03, PML4_START)?;
    write(PD_START | 0x03, PDPT_START)?;
    for index in 0..512u64 {
        // Present, writable, 2 MiB page.
        write((index << 21) | 0x83, PD_START + index * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::memory::{create_guest_memory, ram_layout};

    #[test]
    fn e820_reserves_bios_areas_and_covers_ram() {
        let layout = ram_layout(512 << 20);
        let map = e820_map(&layout);
        assert_eq!(
            map,
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x400, 2),
                (0xe0000, 0x20000, 2),
                (0x100000, (512 << 20) - 0x100000, 1),
                (0xb000_0000, 0x1000_0000, 2),
            ]
        );
        let large = e820_map(&ram_layout(4 << 30));
        assert_eq!(large.last(), Some(&(4 << 30, 2 << 30, 1)));
        assert!(
            large.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "{large:x?}"
        );
        let usable: u64 = large.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
        assert_eq!(usable, (4 << 30) - 0x100000 + 0x9fc00);
    }

    #[test]
    fn builtin_guest_boots_through_pvh() {
        let layout = ram_layout(64 << 20);
        let memory = create_guest_memory(&layout).unwrap();
        let image = KernelImage::Builtin(crate::guest::BUILTIN_GUEST);
        let entry = load(&memory, &layout, &image, None, "ferry.tick_ms=5", 0xe0000).unwrap();
        assert!(matches!(entry, Entry::Pvh { .. }));
        let info: hvm_start_info = memory.read_obj(GuestAddress(PVH_START_INFO)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.memmap_entries, 5);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        let mut cmdline = [0u8; 16];
        memory
            .read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmdline, b"ferry.tick_ms=5\0");
    }

    #[test]
    fn zero_page_carries_cmdline_and_e820() {
        let layout = ram_layout(64 << 20);
        let memory = create_guest_memory(&layout).unwrap();
        write_zero_page(&memory, &layout, None, None, "console=ttyS0", 0xe0000).unwrap();
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 14);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries, 5);
        let last = params.e820_table[3];
        assert_eq!(
            ({ last.addr }, { last.size }),
            (0x100000, (64 << 20) - 0x100000)
        );
    }

    /// The smallest image linux-loader accepts as a bzImage: one setup sector with a 2.15
    /// header, then the protected-mode payload.
    fn tiny_bzimage() -> Vec<u8> {
        let mut image = vec![0u8; 1024 + 4096];
        image[0x1f1] = 1; // setup_sects
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
        image[0x260..0x264].copy_from_slice(&0x0080_0000u32.to_le_bytes()); // init_size
        image[1024..].fill(0x90);
        image
    }

    #[test]
    fn bzimage_boots_through_the_64_bit_protocol_with_its_header() {
        let layout = ram_layout(64 << 20);
        let memory = create_guest_memory(&layout).unwrap();
        let image: &'static [u8] = Box::leak(tiny_bzimage().into_boxed_slice());
        let entry = load(
            &memory,
            &layout,
            &KernelImage::Builtin(image),
            None,
            "quiet",
            0xe0000,
        )
        .unwrap();
        assert_eq!(entry, Entry::Linux64 { entry: 0x100200 });
        let params: boot_params = memory.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!(
            { params.hdr.init_size },
            0x0080_0000,
            "the image's header is passed on"
        );
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut payload = [0u8; 16];
        memory
            .read_slice(&mut payload, GuestAddress(HIGH_MEMORY_START))
            .unwrap();
        assert_eq!(payload, [0x90; 16], "the protected-mode code is at 1 MiB");
    }

    #[test]
    fn garbage_is_no_kernel() {
        let layout = ram_layout(16 << 20);
        let memory = create_guest_memory(&layout).unwrap();
        static GARBAGE: [u8; 4096] = [0x5a; 4096];
        let error = load(
            &memory,
            &layout,
            &KernelImage::Builtin(&GARBAGE),
            None,
            "",
            0,
        )
        .unwrap_err();
        assert!(matches!(error, BootError::UnknownFormat { .. }), "{error}");
    }
}
