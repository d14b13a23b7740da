//! Segment descriptors (Intel SDM vol. 3A §3.4.5) and their `kvm_segment`
//! form, for the GDTs the VMM writes into guest memory.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// A code or data segment descriptor (8 bytes) built from its fields.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The two 8-byte halves of a 64-bit system descriptor (TSS, LDT).
pub fn system_descriptor(kind: u8, base: u64, limit: u32) -> [u64; 2] {
    // Present, DPL 0, the system type; byte granularity.
    let low = descriptor(0x80 | u16::from(kind), base as u32, limit);
    [low, base >> 32]
}

/// Flag words for `descriptor`: type | S << 4 | DPL << 5 | P << 7 | AVL << 12
/// | L << 13 | D/B << 14 | G << 15.
pub mod flags {
    /// 64-bit ring-0 code, readable, accessed.
    pub const KERNEL_CODE64: u16 = 0xa09b;
    /// Ring-0 data, writable, accessed, 32-bit.
    pub const KERNEL_DATA: u16 = 0xc093;
    /// 32-bit ring-0 code (PVH entry).
    pub const KERNEL_CODE32: u16 = 0xc09b;
    /// 64-bit ring-3 code.
    pub const USER_CODE64: u16 = 0xa0fb;
    /// Ring-3 data.
    pub const USER_DATA: u16 = 0xc0f3;
    /// 32-bit ring-3 code (compatibility mode; unused but conventional).
    pub const USER_CODE32: u16 = 0xc0fb;
}

/// Type of an available 64-bit TSS.
pub const TSS64_AVAILABLE: u8 = 0x9;
/// Type of a busy 64-bit TSS (what TR holds once loaded).
pub const TSS64_BUSY: u8 = 0xb;

/// The `kvm_segment` for a code/data descriptor at GDT index `index`.
pub fn kvm_segment_from(index: u16, desc: u64) -> kvm_segment {
    let rpl = ((desc >> 45) & 0x3) as u16;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: expanded_limit(desc),
        selector: (index * 8) | rpl,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 0x3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g: ((desc >> 55) & 1) as u8,
        avl: ((desc >> 52) & 1) as u8,
        unusable: u8::from((desc >> 47) & 1 == 0),
        padding: 0,
    }
}

/// The byte limit a descriptor describes (scaled by 4 KiB when G is set).
fn expanded_limit(desc: u64) -> u32 {
    let raw = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    if (desc >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` for TR pointing at a busy 64-bit TSS.
pub fn tss_segment(index: u16, base: u64, limit: u32) -> kvm_segment {
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: TSS64_BUSY,
        present: 1,
        ..Default::default()
    }
}

/// Loads flat segments: CS from `code`, every data segment from `data`,
/// TR from `tr`.
pub fn load_segments(s: &mut kvm_sregs, code: kvm_segment, data: kvm_segment, tr: kvm_segment) {
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = tr;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_flat_segments() {
        assert_eq!(
            descriptor(flags::KERNEL_CODE64, 0, 0xfffff),
            0x00af_9b00_0000_ffff
        );
        assert_eq!(
            descriptor(flags::KERNEL_DATA, 0, 0xfffff),
            0x00cf_9300_0000_ffff
        );
        assert_eq!(
            descriptor(flags::USER_CODE64, 0, 0xfffff),
            0x00af_fb00_0000_ffff
        );
    }

    #[test]
    fn kvm_segment_matches_descriptor_fields() {
        let seg = kvm_segment_from(6, descriptor(flags::USER_CODE64, 0, 0xfffff));
        assert_eq!(seg.selector, 0x33);
        assert_eq!(
            (seg.type_, seg.dpl, seg.l, seg.db, seg.g, seg.s),
            (0xb, 3, 1, 0, 1, 1)
        );
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
        let data = kvm_segment_from(5, descriptor(flags::USER_DATA, 0x1234_5678, 0xfffff));
        assert_eq!(data.selector, 0x2b);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!((data.type_, data.db), (3, 1));
        let empty = kvm_segment_from(0, 0);
        assert_eq!(empty.unusable, 1);
    }

    #[test]
    fn system_descriptor_splits_a_64_bit_base() {
        let [lo, hi] = system_descriptor(TSS64_AVAILABLE, 0x1_2345_6000, 0x2068);
        assert_eq!(hi, 1);
        assert_eq!(lo & 0xffff, 0x2068);
        assert_eq!((lo >> 16) & 0xff_ffff, 0x45_6000);
        assert_eq!(lo >> 56, 0x23);
        assert_eq!((lo >> 40) & 0xff, 0x89);
    }
}
