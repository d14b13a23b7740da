//! Entering bare-metal code directly at CPL3 in 64-bit mode.
//!
//! The lab host's KVM emulates every CPL0 instruction but runs CPL3 natively
//! (docs/LAB.md), so the lab guests and the mirror payload start in user mode with
//! everything a kernel would have set up done by the VMM instead (the same
//! setup can enter a lab guest at CPL0, [`Ring::Kernel`], on hosts whose ring
//! 0 runs natively, for what only ring 0 may do: hypercalls):
//!
//! - a GDT with flat ring-0 and ring-3 segments (user data 0x2b, user code
//!   0x33, as Linux numbers them) and one 64-bit TSS descriptor per vCPU;
//! - port I/O allowed at CPL3 in both ways a CPU may check it: RFLAGS.IOPL
//!   = 3 (real CPUs, and KVM's emulator on an ordinary SVM/VMX host, then
//!   skip the bitmap: with only the bitmap, the emulated check there refuses
//!   the busy TSS that TR holds and every `out` is a #GP) and a TSS per vCPU
//!   whose I/O permission bitmap allows every port (what the PVM lab host
//!   reads, ignoring IOPL);
//! - identity page tables with the U bit, 2 MiB pages, over what the image
//!   may touch;
//! - CR0 = PG|WP|NE|ET|MP|PE, CR4 = PAE|OSFXSR|OSXMMEXCPT|OSXSAVE,
//!   EFER = LME|LMA, no IDT (a fault becomes a triple fault, which the VMM
//!   sees as a shutdown exit);
//! - RIP = entry, RSP = top of the vCPU's stack, RDI = its parameter block.

use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use cgsvmm_fw_abi as abi;

use super::{BootError, VcpuBoot};
use crate::x86::gdt::{self, flags};
use crate::x86::paging::{self, Mapping, PTE_USER};
use crate::x86::{cr0, cr4, efer};

/// GDT slots.
const GDT_KERNEL_CODE: u16 = 1;
const GDT_KERNEL_DATA: u16 = 2;
const GDT_USER_CODE32: u16 = 4;
const GDT_USER_DATA: u16 = 5;
const GDT_USER_CODE64: u16 = 6;
const GDT_FIRST_TSS: u16 = 8;

/// 64-bit TSS (SDM vol. 3A §8.7): 104 bytes, I/O map base at offset 102.
const TSS_SIZE: u64 = 104;
const TSS_RSP0_OFFSET: u64 = 4;
const TSS_IOMAP_BASE_OFFSET: u64 = 102;
/// 65536 ports, one bit each, all clear (allowed).
const IO_BITMAP_SIZE: u64 = 8192;
/// Limit covering the TSS, the bitmap and the trailing all-ones byte the
/// CPU requires after it.
const TSS_LIMIT: u32 = (TSS_SIZE + IO_BITMAP_SIZE) as u32;
/// Each vCPU's TSS gets three pages.
const TSS_STRIDE: u64 = 0x3000;
/// RFLAGS at entry: bit 1 (reserved, always set) and IOPL = 3, so that CPL3
/// may use every port without consulting the TSS (SDM vol. 1 §19.5.1); IF
/// stays clear (the lab guests and the helper poll).
const ENTRY_RFLAGS: u64 = 0x2 | (3 << 12);

/// The privilege level an image starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// CPL3 (user code and data segments): every image on the PVM lab host.
    User,
    /// CPL0 (kernel segments), same tables and TSS: needs a host whose ring 0
    /// runs natively (on the PVM host it runs under the instruction emulator
    /// and a hypercall never returns).
    Kernel,
}

/// Where a CPL3 image's boot structures go.
#[derive(Debug, Clone, Copy)]
pub struct Cpl3Layout {
    /// The GDT (one page).
    pub gdt: u64,
    /// Parameter blocks, `param_stride` apart.
    pub params: u64,
    /// Distance between parameter blocks.
    pub param_stride: u64,
    /// Page-table area (start, length).
    pub tables: (u64, u64),
    /// First TSS; one every `TSS_STRIDE`.
    pub tss: u64,
    /// First stack (lowest address); one every `stack_size`.
    pub stacks: u64,
    /// Size of each stack.
    pub stack_size: u64,
    /// Most vCPUs the area has room for.
    pub max_vcpus: usize,
}

/// Most bytes a lab image (with bss) may take.
pub const LAB_IMAGE_MAX: u64 = 0x8_0000;
/// Most bytes a mirror image (with bss) may take: it must leave room for
/// the helper's config and secret pages below its mailboxes at +4 MiB.
pub const MIRROR_IMAGE_MAX: u64 = 0x2f_e000;

/// Lab guests: everything in guest RAM between 1 MiB and `LAB_DATA_GPA`.
pub const LAB_LAYOUT: Cpl3Layout = Cpl3Layout {
    gdt: abi::LAB_BOOT_GPA + LAB_IMAGE_MAX,
    params: abi::LAB_BOOT_GPA + LAB_IMAGE_MAX + 0x1000,
    param_stride: size_of::<abi::LabParams>() as u64,
    tables: (abi::LAB_BOOT_GPA + LAB_IMAGE_MAX + 0x2000, 0x7_e000),
    tss: 0x20_0000,
    stacks: 0x28_0000,
    stack_size: 0x8000,
    max_vcpus: abi::MAX_LAB_VCPUS,
};

/// The mirror payload: everything inside the mirror region.
pub const MIRROR_LAYOUT: Cpl3Layout = Cpl3Layout {
    gdt: abi::MIRROR_REGION_GPA + 0x1000,
    params: abi::MIRROR_REGION_GPA + 0x2000,
    param_stride: size_of::<abi::MirrorParams>() as u64,
    tables: (abi::MIRROR_REGION_GPA + 0x1_0000, 0x7_0000),
    tss: abi::MIRROR_REGION_GPA + 0x8_0000,
    stacks: abi::MIRROR_REGION_GPA + 0xc_0000,
    stack_size: 0x4000,
    max_vcpus: abi::MAX_MIRROR_VCPUS,
};

impl Cpl3Layout {
    /// Guest-physical address of vCPU `i`'s parameter block.
    pub fn params_gpa(&self, i: usize) -> u64 {
        self.params + i as u64 * self.param_stride
    }

    fn tss_gpa(&self, i: usize) -> u64 {
        self.tss + i as u64 * TSS_STRIDE
    }

    fn stack_top(&self, i: usize) -> u64 {
        self.stacks + (i as u64 + 1) * self.stack_size
    }
}

/// The GDT: null, ring-0 code/data, ring-3 code/data, then a TSS descriptor
/// (two slots) per vCPU.
fn gdt_entries(layout: &Cpl3Layout, vcpus: usize) -> Vec<u64> {
    let mut gdt = vec![0u64; GDT_FIRST_TSS as usize];
    gdt[GDT_KERNEL_CODE as usize] = gdt::descriptor(flags::KERNEL_CODE64, 0, 0xfffff);
    gdt[GDT_KERNEL_DATA as usize] = gdt::descriptor(flags::KERNEL_DATA, 0, 0xfffff);
    gdt[GDT_USER_CODE32 as usize] = gdt::descriptor(flags::USER_CODE32, 0, 0xfffff);
    gdt[GDT_USER_DATA as usize] = gdt::descriptor(flags::USER_DATA, 0, 0xfffff);
    gdt[GDT_USER_CODE64 as usize] = gdt::descriptor(flags::USER_CODE64, 0, 0xfffff);
    for i in 0..vcpus {
        gdt.extend(gdt::system_descriptor(
            gdt::TSS64_AVAILABLE,
            layout.tss_gpa(i),
            TSS_LIMIT,
        ));
    }
    gdt
}

/// The TSS plus its I/O bitmap: RSP0 set, every port allowed, 0xff after.
fn tss_bytes(rsp0: u64) -> Vec<u8> {
    let mut tss = vec![0u8; (TSS_SIZE + IO_BITMAP_SIZE + 1) as usize];
    tss[TSS_RSP0_OFFSET as usize..][..8].copy_from_slice(&rsp0.to_le_bytes());
    tss[TSS_IOMAP_BASE_OFFSET as usize..][..2].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    *tss.last_mut().expect("non-empty") = 0xff;
    tss
}

/// Writes the GDT, TSSes and page tables (mapping `mapped`, user-accessible,
/// plus `private`, the C-bit or 0, on the ranges and tables the caller
/// marked so) into `mem`, and returns how each of the `vcpus` vCPUs enters
/// `entry` at `ring`. Parameter blocks are the caller's to write at
/// [`Cpl3Layout::params_gpa`].
pub fn prepare(
    mem: &GuestMemoryMmap,
    layout: &Cpl3Layout,
    mapped: &[Mapping],
    private: u64,
    vcpus: usize,
    entry: u64,
    ring: Ring,
) -> Result<Vec<VcpuBoot>, BootError> {
    if vcpus == 0 || vcpus > layout.max_vcpus {
        return Err(BootError::TooManyVcpus(vcpus, layout.max_vcpus));
    }
    let write = |what, gpa: u64, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| BootError::GuestWrite { what, gpa })
    };
    let gdt = gdt_entries(layout, vcpus);
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write("GDT", layout.gdt, &gdt_bytes)?;
    for i in 0..vcpus {
        write("TSS", layout.tss_gpa(i), &tss_bytes(layout.stack_top(i)))?;
    }
    let tables = paging::identity_map(mapped, layout.tables, PTE_USER | private)?;
    let pml4 = tables[0].0;
    paging::write_tables(mem, &tables).map_err(|gpa| BootError::GuestWrite {
        what: "page table",
        gpa,
    })?;

    let gdt_base = layout.gdt;
    let gdt_limit = (gdt.len() * 8 - 1) as u16;
    let (code, data) = match ring {
        Ring::User => (GDT_USER_CODE64, GDT_USER_DATA),
        Ring::Kernel => (GDT_KERNEL_CODE, GDT_KERNEL_DATA),
    };
    let code = gdt::kvm_segment_from(code, gdt[code as usize]);
    let data = gdt::kvm_segment_from(data, gdt[data as usize]);
    Ok((0..vcpus)
        .map(|i| {
            let tr = gdt::tss_segment(GDT_FIRST_TSS + 2 * i as u16, layout.tss_gpa(i), TSS_LIMIT);
            let sregs = move |s: &mut kvm_sregs| {
                s.gdt.base = gdt_base;
                s.gdt.limit = gdt_limit;
                // No IDT: any exception escalates to a triple fault.
                s.idt.base = 0;
                s.idt.limit = 0;
                gdt::load_segments(s, code, data, tr);
                s.cr0 = cr0::PG | cr0::WP | cr0::NE | cr0::ET | cr0::MP | cr0::PE;
                s.cr3 = pml4;
                s.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::OSXSAVE;
                s.efer = efer::LME | efer::LMA;
            };
            VcpuBoot::State {
                regs: kvm_regs {
                    rip: entry,
                    rsp: layout.stack_top(i),
                    rdi: layout.params_gpa(i),
                    rflags: ENTRY_RFLAGS,
                    ..Default::default()
                },
                sregs: Arc::new(sregs),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_layout_stays_inside_the_boot_area() {
        let l = LAB_LAYOUT;
        let end = l.stacks + l.max_vcpus as u64 * l.stack_size;
        assert!(end <= abi::LAB_DATA_GPA, "stacks end at {end:#x}");
        assert!(l.tss + l.max_vcpus as u64 * TSS_STRIDE <= l.stacks);
        assert!(l.tables.0 + l.tables.1 <= l.tss);
        assert!(l.params_gpa(l.max_vcpus) <= l.tables.0);
        assert!(abi::LAB_IMAGE_GPA + LAB_IMAGE_MAX <= l.gdt);
        // The GDT for the most vCPUs fits its page.
        assert!(gdt_entries(&l, l.max_vcpus).len() * 8 <= 0x1000);
    }

    #[test]
    fn mirror_layout_stays_inside_the_mirror_region() {
        let l = MIRROR_LAYOUT;
        assert!(l.gdt >= abi::MIRROR_STATUS_GPA + 0x1000);
        assert!(l.params_gpa(l.max_vcpus) <= l.tables.0);
        assert!(l.tables.0 + l.tables.1 <= l.tss);
        assert!(l.tss + l.max_vcpus as u64 * TSS_STRIDE <= l.stacks);
        assert!(l.stacks + l.max_vcpus as u64 * l.stack_size <= abi::MIRROR_IMAGE_GPA);
    }

    #[test]
    fn tss_allows_every_port() {
        let tss = tss_bytes(0x1234);
        assert_eq!(tss.len() as u32, TSS_LIMIT + 1);
        assert_eq!(u16::from_le_bytes([tss[102], tss[103]]), 104);
        assert!(tss[104..104 + 8192].iter().all(|&b| b == 0));
        assert_eq!(tss[104 + 8192], 0xff);
        assert_eq!(u64::from_le_bytes(tss[4..12].try_into().unwrap()), 0x1234);
    }

    #[test]
    fn prepares_user_mode_entry_state() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let ram = [Mapping::new(0, 16 << 20, PTE_USER)];
        let boots = prepare(&mem, &LAB_LAYOUT, &ram, 0, 2, 0x10_0030, Ring::User).unwrap();
        assert_eq!(boots.len(), 2);
        let VcpuBoot::State { regs, sregs } = &boots[1] else {
            panic!("expected a state")
        };
        assert_eq!(regs.rip, 0x10_0030);
        assert_eq!(regs.rdi, LAB_LAYOUT.params_gpa(1));
        assert_eq!(regs.rsp, LAB_LAYOUT.stacks + 2 * LAB_LAYOUT.stack_size);
        // IOPL 3: CPL3 port I/O does not depend on how a CPU reads the TSS.
        assert_eq!((regs.rflags >> 12) & 3, 3);
        assert_eq!(regs.rflags & (1 << 9), 0, "interrupts stay off");
        let mut s = kvm_sregs::default();
        sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x33, 3, 1));
        assert_eq!((s.ss.selector, s.ss.dpl), (0x2b, 3));
        assert_eq!(s.tr.selector, (GDT_FIRST_TSS + 2) * 8);
        assert_eq!(s.tr.base, LAB_LAYOUT.tss + TSS_STRIDE);
        assert_eq!(s.efer, efer::LME | efer::LMA);
        assert_eq!(s.cr3, LAB_LAYOUT.tables.0);
        // The TSS descriptor in guest memory points at that TSS.
        let desc: u64 = mem
            .read_obj(GuestAddress(LAB_LAYOUT.gdt + u64::from(s.tr.selector)))
            .unwrap();
        assert_eq!((desc >> 16) & 0xff_ffff, s.tr.base & 0xff_ffff);
        assert!(prepare(&mem, &LAB_LAYOUT, &ram, 0, 0, 0, Ring::User).is_err());
        assert!(prepare(&mem, &LAB_LAYOUT, &ram, 0, 33, 0, Ring::User).is_err());
    }

    #[test]
    fn kernel_ring_enters_with_the_kernel_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let ram = [Mapping::new(0, 16 << 20, PTE_USER)];
        let boots = prepare(&mem, &LAB_LAYOUT, &ram, 0, 1, 0x10_0030, Ring::Kernel).unwrap();
        let VcpuBoot::State { sregs, .. } = &boots[0] else {
            panic!("expected a state")
        };
        let mut s = kvm_sregs::default();
        sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x08, 0, 1));
        assert_eq!((s.ss.selector, s.ss.dpl), (0x10, 0));
        // The same TSS and tables as at CPL3.
        assert_eq!(s.tr.selector, GDT_FIRST_TSS * 8);
        assert_eq!(s.cr3, LAB_LAYOUT.tables.0);
    }
}
