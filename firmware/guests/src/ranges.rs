//! Guest-physical ranges the helper is told about, checked before use: the
//! RAM ranges of its launch configuration, and the shared ranges the host
//! declares when it closes a session.

use crate::abi::GpaRange;

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE;

fn aligned(r: &GpaRange) -> bool {
    r.start.is_multiple_of(PAGE) && r.end.is_multiple_of(PAGE)
}

/// Whether `ram` is usable: each range page aligned and non-empty, the
/// ranges ascending and disjoint, none touching `reserved` (the mirror
/// region, where the helper's own pages live). Ends are exclusive, so no
/// range can wrap.
pub fn valid_ram(ram: &[GpaRange], reserved: &GpaRange) -> bool {
    let mut previous_end = 0;
    for r in ram {
        if !aligned(r) || r.start >= r.end || r.start < previous_end {
            return false;
        }
        if r.start < reserved.end && reserved.start < r.end {
            return false;
        }
        previous_end = r.end;
    }
    !ram.is_empty()
}

/// What [`coverage`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every RAM page is shared or marked.
    Complete,
    /// The first page that is neither.
    Missing(u64),
    /// Shared range `n` is not page aligned, empty, out of order,
    /// overlapping the one before, or not inside one RAM range.
    BadRange(u32),
}

/// Pages of RAM before range `i` (the generation table's index base).
fn base(ram: &[GpaRange], i: usize) -> u64 {
    ram[..i].iter().map(|r| (r.end - r.start) / PAGE).sum()
}

/// The first RAM page in `[from, to)` whose table index is not `marked`.
fn first_unmarked(
    ram: &[GpaRange],
    from: u64,
    to: u64,
    marked: &impl Fn(u64) -> bool,
) -> Option<u64> {
    for (i, r) in ram.iter().enumerate() {
        let (start, end) = (from.max(r.start), to.min(r.end));
        let first = base(ram, i);
        let mut gpa = start;
        while gpa < end {
            if !marked(first + (gpa - r.start) / PAGE) {
                return Some(gpa);
            }
            gpa += PAGE;
        }
    }
    None
}

/// Whether every page of `ram` is in `shared` or `marked` (by its index in
/// the generation table, RAM ranges in order). `shared` is read once, in
/// order (it may come from memory the host can change), and must be
/// ascending, disjoint, page aligned and each inside one RAM range.
pub fn coverage(
    ram: &[GpaRange],
    shared: impl IntoIterator<Item = GpaRange>,
    marked: impl Fn(u64) -> bool,
) -> Coverage {
    let mut cursor = 0;
    for (n, r) in shared.into_iter().enumerate() {
        let inside = ram.iter().any(|m| m.start <= r.start && r.end <= m.end);
        if !aligned(&r) || r.start >= r.end || r.start < cursor || !inside {
            return Coverage::BadRange(n as u32);
        }
        if let Some(gpa) = first_unmarked(ram, cursor, r.start, &marked) {
            return Coverage::Missing(gpa);
        }
        cursor = r.end;
    }
    match first_unmarked(ram, cursor, u64::MAX, &marked) {
        Some(gpa) => Coverage::Missing(gpa),
        None => Coverage::Complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn r(start: u64, end: u64) -> GpaRange {
        GpaRange { start, end }
    }

    const MIRROR: GpaRange = r(0xf800_0000, 0xfc00_0000);

    #[test]
    fn ram_ranges_are_checked() {
        assert!(valid_ram(&[r(0, 0x200_0000)], &MIRROR));
        assert!(valid_ram(
            &[r(0, 0xc000_0000), r(0x1_0000_0000, 0x1_4000_0000)],
            &MIRROR
        ));
        assert!(!valid_ram(&[], &MIRROR));
        assert!(!valid_ram(&[r(0, 0x1001)], &MIRROR), "unaligned");
        assert!(!valid_ram(&[r(0x2000, 0x1000)], &MIRROR), "reversed");
        assert!(!valid_ram(&[r(0x1000, 0x1000)], &MIRROR), "empty");
        assert!(
            !valid_ram(&[r(0, 0x4000), r(0x2000, 0x8000)], &MIRROR),
            "overlapping"
        );
        assert!(
            !valid_ram(&[r(0x8000, 0x9000), r(0, 0x4000)], &MIRROR),
            "out of order"
        );
        assert!(
            !valid_ram(&[r(0, 0xf900_0000)], &MIRROR),
            "into the mirror region"
        );
        assert!(
            !valid_ram(&[r(0xfb00_0000, 0x1_0000_0000)], &MIRROR),
            "over the mirror region"
        );
    }

    #[test]
    fn coverage_finds_the_first_page_neither_shared_nor_marked() {
        let ram = [r(0, 0x10000), r(0x20000, 0x24000)]; // 16 + 4 pages
        let all = |_| true;
        assert_eq!(coverage(&ram, [], all), Coverage::Complete);
        let none = |_| false;
        assert_eq!(coverage(&ram, [], none), Coverage::Missing(0));
        assert_eq!(
            coverage(&ram, [r(0, 0x10000), r(0x20000, 0x24000)], none),
            Coverage::Complete
        );
        // Page 5 unmarked, not shared.
        let but5 = |i| i != 5;
        assert_eq!(coverage(&ram, [], but5), Coverage::Missing(0x5000));
        assert_eq!(
            coverage(&ram, [r(0x5000, 0x6000)], but5),
            Coverage::Complete
        );
        // Index 17 is the second page of the second range.
        let but17 = |i| i != 17;
        assert_eq!(
            coverage(&ram, [r(0x1000, 0x3000)], but17),
            Coverage::Missing(0x21000)
        );
        assert_eq!(
            coverage(&ram, [r(0x21000, 0x22000)], but17),
            Coverage::Complete
        );
    }

    #[test]
    fn bad_shared_ranges_are_refused() {
        let ram = [r(0, 0x10000), r(0x20000, 0x24000)];
        let all = |_| true;
        assert_eq!(coverage(&ram, [r(0, 0x800)], all), Coverage::BadRange(0));
        assert_eq!(
            coverage(&ram, [r(0x2000, 0x2000)], all),
            Coverage::BadRange(0)
        );
        assert_eq!(
            coverage(&ram, [r(0x4000, 0x6000), r(0x5000, 0x7000)], all),
            Coverage::BadRange(1)
        );
        assert_eq!(
            coverage(&ram, [r(0x4000, 0x6000), r(0x1000, 0x2000)], all),
            Coverage::BadRange(1)
        );
        assert_eq!(
            coverage(&ram, [r(0xf000, 0x21000)], all),
            Coverage::BadRange(0),
            "across the hole"
        );
        assert_eq!(
            coverage(&ram, [r(0x30000, 0x31000)], all),
            Coverage::BadRange(0),
            "outside RAM"
        );
        assert_eq!(
            coverage(&ram, [r(u64::MAX - 0xfff, u64::MAX)], all),
            Coverage::BadRange(0)
        );
    }
}
