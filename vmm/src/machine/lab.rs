//! The lab guests' side of boot: which RAM each main vCPU owns and the
//! parameter blocks that tell it so.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use cgsvmm_fw_abi::{self as abi, GpaRange, LabParams};

use crate::boot::cpl3::LAB_LAYOUT;
use crate::boot::BootError;
use crate::memory::MemoryLayout;

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE_SIZE;

/// Splits the lab data area (RAM from `LAB_DATA_GPA`, both sides of the
/// hole) into `vcpus` contiguous, page-aligned slices of near-equal size.
/// Each slice is at most [`abi::LAB_MAX_RANGES`] ranges.
pub fn data_slices(layout: &MemoryLayout, vcpus: usize) -> Vec<Vec<GpaRange>> {
    let areas: Vec<GpaRange> = layout
        .ram_ranges()
        .into_iter()
        .filter_map(|(start, len)| {
            let end = start + len;
            let start = start.max(abi::LAB_DATA_GPA);
            (end > start).then_some(GpaRange { start, end })
        })
        .collect();
    let total_pages: u64 = areas.iter().map(|a| (a.end - a.start) / PAGE_SIZE).sum();
    let per_vcpu = total_pages / vcpus as u64;
    let mut slices = Vec::with_capacity(vcpus);
    let mut area = 0;
    let mut cursor = areas.first().map_or(0, |a| a.start);
    for _ in 0..vcpus {
        let mut left = per_vcpu * PAGE_SIZE;
        let mut slice = Vec::new();
        while left > 0 && area < areas.len() {
            let take = left.min(areas[area].end - cursor);
            slice.push(GpaRange {
                start: cursor,
                end: cursor + take,
            });
            cursor += take;
            left -= take;
            if cursor == areas[area].end {
                area += 1;
                cursor = areas.get(area).map_or(cursor, |a| a.start);
            }
        }
        slices.push(slice);
    }
    slices
}

/// Writes every main vCPU's [`LabParams`] (`flags`: `LAB_FLAG_*`).
pub fn write_params(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    vcpus: usize,
    tsc_khz: u64,
    flags: u32,
) -> Result<(), BootError> {
    for (i, slice) in data_slices(layout, vcpus).into_iter().enumerate() {
        let mut params = LabParams {
            magic: abi::PARAMS_MAGIC,
            vcpu_index: i as u32,
            vcpu_count: vcpus as u32,
            tsc_khz,
            range_count: slice.len() as u32,
            flags,
            ..Default::default()
        };
        params.ranges[..slice.len()].copy_from_slice(&slice);
        let gpa = LAB_LAYOUT.params_gpa(i);
        mem.write_slice(params.as_bytes(), GuestAddress(gpa))
            .map_err(|_| BootError::GuestWrite {
                what: "lab parameters",
                gpa,
            })?;
    }
    Ok(())
}

/// The highest pass the dirtier's vCPU `vcpu` reported in `lines` (its
/// serial output: `dirtier: vcpu N pass P ok`).
pub fn last_pass<S: AsRef<str>>(lines: impl IntoIterator<Item = S>, vcpu: usize) -> Option<u64> {
    let prefix = format!("dirtier: vcpu {vcpu} pass ");
    lines
        .into_iter()
        .filter_map(|l| {
            l.as_ref()
                .strip_prefix(&prefix)?
                .strip_suffix(" ok")?
                .parse()
                .ok()
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GIB, MIB};

    fn check(layout: MemoryLayout, vcpus: usize) -> Vec<Vec<GpaRange>> {
        let slices = data_slices(&layout, vcpus);
        assert_eq!(slices.len(), vcpus);
        let mut all: Vec<GpaRange> = slices.iter().flatten().copied().collect();
        all.sort_by_key(|r| r.start);
        for w in all.windows(2) {
            assert!(w[0].end <= w[1].start, "overlap {w:?}");
        }
        for r in &all {
            assert!(r.start >= abi::LAB_DATA_GPA);
            assert!(
                layout.contains(r.start, r.end - r.start),
                "{r:?} outside RAM"
            );
            assert_eq!(r.start % PAGE_SIZE, 0);
            assert_eq!(r.end % PAGE_SIZE, 0);
        }
        let sizes: Vec<u64> = slices
            .iter()
            .map(|s| s.iter().map(|r| r.end - r.start).sum())
            .collect();
        assert!(sizes.iter().all(|&s| s == sizes[0] && s > 0), "{sizes:?}");
        for s in &slices {
            assert!(s.len() <= abi::LAB_MAX_RANGES);
        }
        slices
    }

    #[test]
    fn two_vcpus_split_a_small_guest() {
        let slices = check(MemoryLayout::new(256 * MIB), 2);
        assert_eq!(
            slices[0],
            vec![GpaRange {
                start: 4 * MIB,
                end: 130 * MIB
            }]
        );
        assert_eq!(
            slices[1],
            vec![GpaRange {
                start: 130 * MIB,
                end: 256 * MIB
            }]
        );
    }

    #[test]
    fn slices_straddle_the_hole() {
        let slices = check(MemoryLayout::new(4 * GIB), 3);
        assert!(slices.iter().any(|s| s.len() == 2));
        check(MemoryLayout::new(5 * GIB), 32);
        check(MemoryLayout::new(16 * MIB), 1);
    }
}
