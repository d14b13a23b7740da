//! The ABI between cgsvmm and its bare-metal guest code.
//!
//! This crate owns every structure and constant that both the VMM (host side)
//! and the code in `firmware/guests` (guest side, `no_std`, CPL3) read or
//! write: the image header at the start of every embedded image, the
//! per-vCPU parameter blocks the VMM hands over in RDI, the mirror status
//! words, the lab control port, and the guest-physical layout of the lab
//! boot area and of the mirror region. It must not depend on anything of ours
//! and must stay `no_std`.
//!
//! # Guest-physical layout
//!
//! ```text
//! guest RAM (in the guest's E820)          mirror region (NOT in the E820)
//! 0x0000_0000 +------------------+         MIRROR_REGION_GPA = 0xf800_0000
//!             | unused           |         +0x00_0000 status page (one
//! LAB_BOOT_GPA (0x10_0000)         |                    MirrorStatus per vCPU)
//!             | image header+code|         +0x00_1000 GDT
//!             | GDT, params      |         +0x00_2000 MirrorParams per vCPU
//!             | page tables      |         +0x01_0000 page tables
//!             | TSS + stack/vCPU |         +0x08_0000 TSS + stack per vCPU
//! LAB_DATA_GPA (0x40_0000)          |         +0x10_0000 mirror image (MH)
//!             | dirtier slices   |         +0x40_0000 MH mailboxes
//!             | ...              |         +0x100_0000 MH generation table
//!                                          +0x400_0000 end (64 MiB)
//! ```
//!
//! Guests are entered at CPL3 in 64-bit mode with RDI pointing at their
//! parameter block, RSP at the top of their own stack, and identity page
//! tables built by the VMM (2 MiB pages, U bit set).
//!
//! # Sequence (lab guest)
//!
//! ```text
//! VMM                                   guest vCPU i
//!  | write image, GDT, TSS, tables,       |
//!  | LabParams[i]; set sregs/regs ------> | entry(rdi = &LabParams[i])
//!  |                                      | ... work, `out` bytes to serial
//!  | <-------- out LAB_PORT, LAB_CMD_*    | power off / report failure
//! ```

#![no_std]

pub mod helper;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The guest page size: what the helper seals, dirty logging tracks and
/// the stream moves (the one definition; everything else imports it).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] for guest-physical arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// The KVM hypercall a guest converts pages between private and shared
/// with (KVM_HC_MAP_GPA_RANGE, Linux's include/uapi/linux/kvm_para.h): the
/// VMM answers it, the ring-0 dirtier makes it.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// CPUID 0x40000001 EAX bit telling the guest that hypercall is answered.
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 16;

/// Magic at the start of every embedded image ("CGSVFW01").
pub const IMAGE_MAGIC: [u8; 8] = *b"CGSVFW01";
/// Version of [`ImageHeader`] this crate describes.
pub const IMAGE_HEADER_VERSION: u32 = 1;

/// What an image is for (the `kind` field of [`ImageHeader`]).
pub const IMAGE_KIND_LAB: u32 = 1;
/// An image that runs on the mirror vCPUs.
pub const IMAGE_KIND_MIRROR: u32 = 2;
/// The migration helper (runs on the mirror vCPUs; see [`helper`]).
pub const IMAGE_KIND_HELPER: u32 = 3;

/// Header placed by the linker at the very first byte of every image.
///
/// The VMM reads it to learn where the image expects to be loaded, where to
/// enter it, and how far its zero-initialised data extends.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ImageHeader {
    /// [`IMAGE_MAGIC`].
    pub magic: [u8; 8],
    /// [`IMAGE_HEADER_VERSION`].
    pub version: u32,
    /// `IMAGE_KIND_*`.
    pub kind: u32,
    /// Guest-physical address of the first byte of the image.
    pub load_addr: u64,
    /// Guest-physical address of the entry point.
    pub entry: u64,
    /// First guest-physical byte after the image's `.bss`.
    pub image_end: u64,
}

/// Port of the lab control device. A 32-bit `out` of a `LAB_CMD_*` value
/// asks the VMM for something; there is no such device on real machines, so
/// only lab guests use it.
pub const LAB_PORT: u16 = 0x0f00;
/// The guest is done: power the VM off (the VMM exits 0).
pub const LAB_CMD_POWER_OFF: u32 = 1;
/// The guest detected a failure it already described on the serial port.
pub const LAB_CMD_FAIL: u32 = 2;

/// The vCPU has nothing to do for now: the VMM may leave it out of KVM_RUN
/// for a short while before re-entering it.
pub const LAB_CMD_YIELD: u32 = 3;

/// The helper vCPU `index` (bits 16..) waits for work: the VMM keeps it out
/// of KVM_RUN until its doorbell rings or a short timeout passes.
pub const LAB_CMD_WAIT: u32 = 4;

/// The helper on this vCPU serves nothing (its launch configuration is
/// unusable, or its index is out of range or already another helper's):
/// the VMM keeps it out of KVM_RUN for a while each time it says so.
pub const LAB_CMD_HELPER_REFUSED: u32 = 5;

/// The guest declares the 2 MiB block `index` (bits 16..) of guest RAM
/// shared (plaintext to the host): the lab's stand-in for
/// KVM_HC_MAP_GPA_RANGE, which cannot exit on the lab host. Both feed the
/// VMM's one shared/private map.
pub const LAB_CMD_SHARE_2M: u32 = 6;
/// The guest declares the 2 MiB block `index` (bits 16..) private again.
pub const LAB_CMD_PRIVATE_2M: u32 = 7;
/// Bytes of the block [`LAB_CMD_SHARE_2M`] and [`LAB_CMD_PRIVATE_2M`] name.
pub const LAB_SHARE_BLOCK: u64 = 2 << 20;

/// COM1, the serial port the lab guests print on.
pub const SERIAL_PORT: u16 = 0x3f8;

/// Start of the lab boot area in guest RAM (image, GDT, tables, stacks).
pub const LAB_BOOT_GPA: u64 = 0x10_0000;
/// Where lab images are linked.
pub const LAB_IMAGE_GPA: u64 = LAB_BOOT_GPA;
/// First byte of guest RAM that lab guests may use as data.
pub const LAB_DATA_GPA: u64 = 0x40_0000;

/// Guest-physical base of the mirror region (in the 32-bit hole, below the
/// IOAPIC, never reported in the guest's E820).
pub const MIRROR_REGION_GPA: u64 = 0xf800_0000;
/// Size of the mirror region: boot structures, the image, mailboxes and the
/// helper's generation table.
pub const MIRROR_REGION_SIZE: u64 = 0x400_0000;
/// Where mirror images are linked.
pub const MIRROR_IMAGE_GPA: u64 = MIRROR_REGION_GPA + 0x10_0000;
/// Page of [`MirrorStatus`] entries, one per mirror vCPU.
pub const MIRROR_STATUS_GPA: u64 = MIRROR_REGION_GPA;

/// At most this many main vCPUs for lab guests (parameter page, TSS area).
pub const MAX_LAB_VCPUS: usize = 32;
/// At most this many mirror vCPUs.
pub const MAX_MIRROR_VCPUS: usize = 16;

/// Magic in every parameter block ("CGSVPARM" little endian).
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"CGSVPARM");

/// A half-open range of guest-physical addresses.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct GpaRange {
    /// First byte.
    pub start: u64,
    /// First byte after the range.
    pub end: u64,
}

/// [`LabParams::flags`]: the dirtier's vCPU 0 also turns the last block
/// it shared private and back again, once a pass, and while the block is
/// private writes [`LAB_SECRET_MARK`] into word 1 of each of its pages (the
/// stand-in for data a real guest keeps private: a host that ever sends it
/// as plaintext leaked it).
pub const LAB_FLAG_CONVERT: u32 = 1;
/// What [`LAB_FLAG_CONVERT`] writes into a block while it is private.
pub const LAB_SECRET_MARK: u64 = u64::from_le_bytes(*b"PRIVATE!");

/// Most RAM ranges a lab vCPU is given (one below and one above the 32-bit hole).
pub const LAB_MAX_RANGES: usize = 2;

/// Parameter block of one main vCPU running a lab guest (RDI at entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct LabParams {
    /// [`PARAMS_MAGIC`].
    pub magic: u64,
    /// Index of this vCPU among the main vCPUs.
    pub vcpu_index: u32,
    /// Number of main vCPUs.
    pub vcpu_count: u32,
    /// TSC frequency in kHz (the guest reads the host TSC at CPL3).
    pub tsc_khz: u64,
    /// Number of valid entries in `ranges`.
    pub range_count: u32,
    /// `LAB_FLAG_*`.
    pub flags: u32,
    /// The guest RAM this vCPU owns (for the dirtier: its slice).
    pub ranges: [GpaRange; LAB_MAX_RANGES],
}

/// Parameter block of one mirror vCPU (RDI at entry).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct MirrorParams {
    /// [`PARAMS_MAGIC`].
    pub magic: u64,
    /// Index of this vCPU among the mirror vCPUs.
    pub vcpu_index: u64,
    /// Where this vCPU's [`MirrorStatus`] lives.
    pub status_gpa: u64,
    /// A guest-RAM word the payload copies into `MirrorStatus::probe_value`
    /// on every iteration (0 for none).
    pub probe_gpa: u64,
}

/// What a mirror vCPU publishes for the VMM (shared, never encrypted).
///
/// Each entry fills a cache line so that vCPUs do not share one.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct MirrorStatus {
    /// Loop iterations so far; increases while the vCPU runs.
    pub counter: u64,
    /// The last value read at `MirrorParams::probe_gpa`.
    pub probe_value: u64,
    /// Reserved.
    pub reserved: [u64; 6],
}

// The layout holds together (checked at compile time).
const _: () = {
    // Every mirror vCPU's status fits the status page.
    assert!(MAX_MIRROR_VCPUS * core::mem::size_of::<MirrorStatus>() <= 0x1000);
    // Every lab vCPU's parameters fit one page.
    assert!(MAX_LAB_VCPUS * core::mem::size_of::<LabParams>() <= 0x1000);
    // The mirror region stays below the IOAPIC and is 2 MiB aligned.
    assert!(MIRROR_REGION_GPA + MIRROR_REGION_SIZE <= 0xfec0_0000);
    assert!(MIRROR_REGION_GPA.is_multiple_of(0x20_0000));
};

/// The dirtier writes the pass number at this offset of every page it owns.
pub const DIRTIER_PASS_OFFSET: usize = 0;

/// The fill word the dirtier writes at word `index` of the page at `gpa` in
/// pass `pass`; word 0 is the pass number itself.
#[inline(always)]
pub fn dirtier_pattern(gpa: u64, pass: u64, index: u64) -> u64 {
    (gpa ^ pass.rotate_left(40) ^ index.rotate_left(20)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn image_header_layout() {
        assert_eq!(size_of::<ImageHeader>(), 40);
        assert_eq!(offset_of!(ImageHeader, version), 8);
        assert_eq!(offset_of!(ImageHeader, kind), 12);
        assert_eq!(offset_of!(ImageHeader, load_addr), 16);
        assert_eq!(offset_of!(ImageHeader, entry), 24);
        assert_eq!(offset_of!(ImageHeader, image_end), 32);
    }

    #[test]
    fn params_layout() {
        assert_eq!(size_of::<GpaRange>(), 16);
        assert_eq!(size_of::<LabParams>(), 64);
        assert_eq!(offset_of!(LabParams, tsc_khz), 16);
        assert_eq!(offset_of!(LabParams, range_count), 24);
        assert_eq!(offset_of!(LabParams, flags), 28);
        assert_eq!(offset_of!(LabParams, ranges), 32);
        assert_eq!(size_of::<MirrorParams>(), 32);
        assert_eq!(offset_of!(MirrorParams, probe_gpa), 24);
        assert_eq!(size_of::<MirrorStatus>(), 64);
        assert_eq!(align_of::<MirrorStatus>(), 64);
        assert_eq!(offset_of!(MirrorStatus, probe_value), 8);
    }

    #[test]
    fn pattern_depends_on_every_input() {
        let base = dirtier_pattern(0x40_0000, 3, 1);
        assert_ne!(base, dirtier_pattern(0x40_1000, 3, 1));
        assert_ne!(base, dirtier_pattern(0x40_0000, 4, 1));
        assert_ne!(base, dirtier_pattern(0x40_0000, 3, 2));
    }
}
