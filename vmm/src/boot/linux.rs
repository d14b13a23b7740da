//! Booting Linux directly: the kernel through linux-loader (ELF with a PVH
//! note → PVH entry; bzImage or ELF otherwise → 64-bit boot protocol), the
//! initrd high in low memory, the command line, the zero page with the E820
//! map (Documentation/arch/x86/boot.rst), and the MP table for SMP.
//!
//! Guest-physical layout of what this module writes:
//!
//! ```text
//! 0x0500 GDT          0x6000 PVH start info (+ module list, memory map)
//! 0x7000 zero page    0x9000 page tables (identity, first 1 GiB)
//! 0x8ff0 boot stack   0x2_0000 command line
//! 0x9_fc00 MP table   0x10_0000 kernel (HIMEM_START and up), initrd at the
//!                     top of low memory
//! ```
//!
//! These guests need native ring 0; on the PVM lab host they are loaded and
//! started but cannot finish booting (docs/LAB.md).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{mptable, BootError, VcpuBoot};
use crate::memory::{MemoryLayout, EBDA_START};
use crate::x86::gdt::{self, flags};
use crate::x86::paging;
use crate::x86::{cr0, cr4, efer};

/// Kernels load at or above this (the bzImage protected-mode part goes to
/// its code32_start, 1 MiB; an ELF vmlinux to its physical addresses).
pub const HIMEM_START: u64 = 0x10_0000;
/// The zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The PVH start info.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initrd).
const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
const PVH_MEMMAP_START: u64 = 0x6080;
/// The command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line we pass.
pub const CMDLINE_MAX: usize = 4096;
/// The boot GDT.
const GDT_START: u64 = 0x500;
/// Page tables for the 64-bit entry (identity map of the first GiB).
const PAGE_TABLES: (u64, u64) = (0x9000, 0x3000);
/// Initial stack of the BSP.
const BOOT_STACK: u64 = 0x8ff0;
/// The 64-bit entry point is this far into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// boot_params.hdr magic values (boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// PVH start info magic and version with a memory map.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PVH_VERSION_WITH_MEMMAP: u32 = 1;
use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE_SIZE;

/// What the user gave to boot Linux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read {
        path: path.clone(),
        source,
    })
}

/// Where the initrd of `size` bytes goes: as high as possible in low memory,
/// below what the kernel can address, above the kernel.
pub fn initrd_address(
    size: u64,
    kernel_end: u64,
    below_4g: u64,
    addr_max: u64,
) -> Result<u64, BootError> {
    let ceiling = below_4g.min(addr_max.saturating_add(1));
    let start = ceiling.checked_sub(size).map(|s| s & !(PAGE_SIZE - 1));
    match start {
        Some(s) if s >= kernel_end && size > 0 => Ok(s),
        _ => Err(BootError::DoesNotFit(format!(
            "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {ceiling:#x}"
        ))),
    }
}

/// The zero page for the 64-bit boot protocol.
pub fn zero_page(
    header: Option<setup_header>,
    e820: &[(u64, u64, u32)],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::DoesNotFit(format!(
            "{} E820 entries",
            e820.len()
        )));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

fn load_kernel(mem: &GuestMemoryMmap, path: &PathBuf) -> Result<KernelLoaderResult, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Read {
        path: path.clone(),
        source,
    })?;
    match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(result),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => Ok(BzImage::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(HIMEM_START)),
        )?),
        Err(e) => Err(e.into()),
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    gpa: u64,
    v: T,
) -> Result<(), BootError> {
    mem.write_obj(v, GuestAddress(gpa))
        .map_err(|_| BootError::GuestWrite { what, gpa })
}

/// Loads kernel, initrd, command line, MP table and boot parameters, and
/// returns how every vCPU starts (the BSP at the kernel's entry, the APs in
/// their reset state waiting for INIT-SIPI).
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    config: &LinuxConfig,
    vcpus: usize,
) -> Result<Vec<VcpuBoot>, BootError> {
    let kernel = load_kernel(mem, &config.kernel)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX)?;
    if !config.cmdline.is_empty() {
        cmdline.insert_str(&config.cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    let initrd = match &config.initrd {
        Some(path) => {
            let bytes = read_file(path)?;
            let addr_max = kernel
                .setup_header
                .map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
            let addr = initrd_address(
                bytes.len() as u64,
                kernel.kernel_end,
                layout.below_4g(),
                addr_max,
            )?;
            mem.write_slice(&bytes, GuestAddress(addr))
                .map_err(|_| BootError::GuestWrite {
                    what: "initrd",
                    gpa: addr,
                })?;
            Some((addr, bytes.len() as u64))
        }
        None => None,
    };

    let mp = mptable::build(EBDA_START, vcpus);
    mem.write_slice(&mp, GuestAddress(EBDA_START))
        .map_err(|_| BootError::GuestWrite {
            what: "MP table",
            gpa: EBDA_START,
        })?;

    let e820 = layout.e820();
    let bsp = match kernel.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_info(mem, &e820, initrd)?;
            log::info!("Linux: PVH entry at {:#x} (ELF note)", entry.0);
            pvh_entry(entry.0)
        }
        _ => {
            let params = zero_page(kernel.setup_header, &e820, cmdline_len, initrd)?;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(|_| BootError::GuestWrite {
                what: "zero page",
                gpa: ZERO_PAGE_START,
            })?;
            let (entry, format) = if kernel.setup_header.is_some() {
                (kernel.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, "bzImage")
            } else {
                (kernel.kernel_load.0, "ELF")
            };
            log::info!("Linux: 64-bit boot protocol entry at {entry:#x} ({format})");
            long_mode_entry(mem, entry)?
        }
    };
    let mut boots = vec![bsp];
    boots.extend(std::iter::repeat_n(VcpuBoot::Reset, vcpus - 1));
    Ok(boots)
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_VERSION_WITH_MEMMAP,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        write(
            mem,
            "PVH module list",
            PVH_MODLIST_START,
            hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            },
        )?;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        write(
            mem,
            "PVH memory map",
            PVH_MEMMAP_START + i as u64 * 24,
            entry,
        )?;
    }
    write(mem, "PVH start info", PVH_INFO_START, info)
}

/// 32-bit flat protected mode, paging off, EBX = start info (PVH ABI).
fn pvh_entry(entry: u64) -> VcpuBoot {
    let code = gdt::kvm_segment_from(1, gdt::descriptor(flags::KERNEL_CODE32, 0, 0xfffff));
    let data = gdt::kvm_segment_from(2, gdt::descriptor(flags::KERNEL_DATA, 0, 0xfffff));
    let tss = gdt::kvm_segment_from(3, gdt::descriptor(0x008b, 0, 0x67));
    VcpuBoot::State {
        regs: kvm_regs {
            rip: entry,
            rbx: PVH_INFO_START,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: Arc::new(move |s: &mut kvm_sregs| {
            gdt::load_segments(s, code, data, tss);
            s.cr0 = cr0::PE | cr0::ET;
            s.cr4 = 0;
        }),
    }
}

/// 64-bit mode at CPL0 with the first GiB identity mapped, RSI = zero page.
fn long_mode_entry(mem: &GuestMemoryMmap, entry: u64) -> Result<VcpuBoot, BootError> {
    let gdt = [
        0,
        gdt::descriptor(flags::KERNEL_CODE64, 0, 0xfffff),
        gdt::descriptor(flags::KERNEL_DATA, 0, 0xfffff),
        gdt::descriptor(0x008b, 0, 0x67),
    ];
    for (i, d) in gdt.iter().enumerate() {
        write(mem, "GDT", GDT_START + i as u64 * 8, *d)?;
    }
    let tables = paging::identity_map(&[paging::Mapping::new(0, 1 << 30, 0)], PAGE_TABLES, 0)?;
    paging::write_tables(mem, &tables).map_err(|gpa| BootError::GuestWrite {
        what: "page table",
        gpa,
    })?;
    let pml4 = tables[0].0;
    let code = gdt::kvm_segment_from(1, gdt[1]);
    let data = gdt::kvm_segment_from(2, gdt[2]);
    let tss = gdt::kvm_segment_from(3, gdt[3]);
    Ok(VcpuBoot::State {
        regs: kvm_regs {
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE_START,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: Arc::new(move |s: &mut kvm_sregs| {
            s.gdt.base = GDT_START;
            s.gdt.limit = (gdt.len() * 8 - 1) as u16;
            gdt::load_segments(s, code, data, tss);
            s.cr0 = cr0::PE | cr0::ET | cr0::PG;
            s.cr3 = pml4;
            s.cr4 = cr4::PAE;
            s.efer = efer::LME | efer::LMA;
        }),
    })
}

/// For firmware boots the kernel travels through fw_cfg: a bzImage is split
/// into its setup sectors and the protected-mode part, as QEMU does.
pub fn split_bzimage(image: &[u8]) -> Option<(&[u8], &[u8])> {
    const SETUP_SECTS_OFFSET: usize = 0x1f1;
    const HDR_MAGIC_OFFSET: usize = 0x202;
    let magic = image.get(HDR_MAGIC_OFFSET..HDR_MAGIC_OFFSET + 4)?;
    if magic != b"HdrS" {
        return None;
    }
    let sects = match *image.get(SETUP_SECTS_OFFSET)? {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (sects + 1) * 512;
    (image.len() > setup_len).then(|| image.split_at(setup_len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MIB;

    #[test]
    fn zero_page_fields() {
        let layout = MemoryLayout::new(512 * MIB);
        let p = zero_page(None, &layout.e820(), 42, Some((0x1000_0000, 0x2000))).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x1000_0000, 0x2000)
        );
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (0x10_0000, 511 * MIB, 1)
        );
        // The header the kernel brought survives, except for what we own.
        let hdr = setup_header {
            setup_sects: 27,
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        let p = zero_page(Some(hdr), &layout.e820(), 0, None).unwrap();
        assert_eq!({ p.hdr.setup_sects }, 27);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x37ff_ffff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn initrd_goes_high_but_below_the_limits() {
        assert_eq!(
            initrd_address(0x1800, 0x200_0000, 256 * MIB, u64::from(u32::MAX)).unwrap(),
            256 * MIB - 0x2000
        );
        assert_eq!(
            initrd_address(0x1000, 0x200_0000, 3 << 30, 0x37ff_ffff).unwrap(),
            0x3800_0000 - 0x1000
        );
        assert!(initrd_address(255 * MIB, 0x200_0000, 256 * MIB, u64::MAX).is_err());
        assert!(initrd_address(0, 0, 256 * MIB, u64::MAX).is_err());
    }

    #[test]
    fn long_mode_entry_state() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        let VcpuBoot::State { regs, sregs } = long_mode_entry(&mem, 0x100_0200).unwrap() else {
            panic!()
        };
        assert_eq!((regs.rip, regs.rsi), (0x100_0200, ZERO_PAGE_START));
        let mut s = kvm_sregs::default();
        sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (8, 1, 0));
        assert_eq!(s.cr3, PAGE_TABLES.0);
        let code: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        // The first PD entry maps 0 as a 2 MiB supervisor page.
        let pd: u64 = mem.read_obj(GuestAddress(PAGE_TABLES.0 + 0x2000)).unwrap();
        assert_eq!(pd, 0x83);
    }

    #[test]
    fn pvh_info_and_entry() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
        let e820 = MemoryLayout::new(16 * MIB).e820();
        write_pvh_info(&mem, &e820, Some((0x80_0000, 0x1000))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.magic, info.nr_modules, info.memmap_entries),
            (XEN_HVM_START_MAGIC_VALUE, 1, 3)
        );
        let m: hvm_memmap_table_entry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 48)).unwrap();
        assert_eq!((m.addr, m.type_), (0x10_0000, 1));
        let VcpuBoot::State { regs, sregs } = pvh_entry(0x100_0000) else {
            panic!()
        };
        assert_eq!(regs.rbx, PVH_INFO_START);
        let mut s = kvm_sregs::default();
        sregs(&mut s);
        assert_eq!((s.cs.l, s.cs.db, s.cr0 & cr0::PG), (0, 1, 0));
    }

    #[test]
    fn bzimage_split_follows_setup_sects() {
        let mut image = vec![0u8; 8192];
        image[0x1f1] = 3;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let (setup, kernel) = split_bzimage(&image).unwrap();
        assert_eq!((setup.len(), kernel.len()), (2048, 8192 - 2048));
        image[0x1f1] = 0;
        assert_eq!(split_bzimage(&image).unwrap().0.len(), 2560);
        image[0x202] = b'X';
        assert!(split_bzimage(&image).is_none());
    }

    #[test]
    fn missing_kernel_is_a_read_error() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 * MIB as usize)]).unwrap();
        let config = LinuxConfig {
            kernel: "/nonexistent/bzImage".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem, &MemoryLayout::new(32 * MIB), &config, 1)
            .err()
            .unwrap();
        assert!(matches!(err, BootError::Read { .. }), "{err}");
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let dir = std::env::temp_dir().join(format!("cgsvmm-linux-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 * MIB as usize)]).unwrap();
        let config = LinuxConfig {
            kernel: path,
            initrd: None,
            cmdline: String::new(),
        };
        let err = load(&mem, &MemoryLayout::new(32 * MIB), &config, 1)
            .err()
            .unwrap();
        assert!(matches!(err, BootError::Kernel(_)), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
