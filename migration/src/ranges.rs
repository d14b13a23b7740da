//! The shared/private map: which guest pages the guest declared shared.
//!
//! Every page starts private. A guest converts ranges with
//! KVM_HC_MAP_GPA_RANGE on real hosts, or through the lab port on the lab
//! host (where hypercalls cannot exit); both feed one [`SharedMap`]. Shared
//! pages travel as plaintext; every other page only through the helpers.
//! The map is kept as page-aligned, ascending, disjoint, non-adjacent
//! ranges, which is the form SEAL and VERIFY_SEAL take.

use std::collections::BTreeMap;

use cgsvmm_fw_abi::GpaRange;

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE;

/// Why a range or a map is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Not page aligned, empty, or wrapping.
    #[error("shared range {0:#x}..{1:#x} is not a page-aligned, non-empty range")]
    Malformed(u64, u64),
    /// Not inside guest RAM.
    #[error("shared range {0:#x}..{1:#x} is not inside guest RAM")]
    OutsideRam(u64, u64),
    /// Not ascending and disjoint.
    #[error("shared ranges are not ascending and disjoint at {0:#x}")]
    Unordered(u64),
    /// More ranges than a stream or a helper takes.
    #[error("{0} shared ranges exceed the limit of {1}")]
    TooMany(usize, usize),
}

/// Shared ranges of guest RAM: start -> end; and the ranges converted
/// since the last [`SharedMap::take_converted`] (a converted page must be
/// sent again, the other way, even if the guest did not write it).
#[derive(Debug, Clone, Default)]
pub struct SharedMap {
    ranges: BTreeMap<u64, u64>,
    converted: Vec<GpaRange>,
    /// More conversions than are kept: take them all as converted.
    overflowed: bool,
    /// Conversions ever made (a sender copying pages watches it).
    conversions: u64,
}

/// Conversions kept before they count as "everything".
const MAX_CONVERTED: usize = 4096;

impl PartialEq for SharedMap {
    fn eq(&self, other: &Self) -> bool {
        self.ranges == other.ranges
    }
}

impl Eq for SharedMap {}

fn inside(ram: &[(u64, u64)], start: u64, end: u64) -> bool {
    ram.iter()
        .any(|&(s, len)| start >= s && end <= s.saturating_add(len))
}

impl SharedMap {
    /// Marks `[start, end)` shared (`shared`) or private, after checking it
    /// is page aligned and inside one RAM range of `ram` (start, length).
    pub fn set(
        &mut self,
        ram: &[(u64, u64)],
        start: u64,
        end: u64,
        shared: bool,
    ) -> Result<(), MapError> {
        if start >= end || !start.is_multiple_of(PAGE) || !end.is_multiple_of(PAGE) {
            return Err(MapError::Malformed(start, end));
        }
        if !inside(ram, start, end) {
            return Err(MapError::OutsideRam(start, end));
        }
        // Cut every range overlapping or touching [start, end) out, keeping
        // its parts outside; then add the union back if sharing.
        let (mut lo, mut hi) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            if shared {
                lo = lo.min(s);
                hi = hi.max(e);
            } else {
                if s < start {
                    self.ranges.insert(s, start);
                }
                if e > end {
                    self.ranges.insert(end, e);
                }
            }
        }
        if shared {
            self.ranges.insert(lo, hi);
        }
        if self.converted.len() < MAX_CONVERTED {
            self.converted.push(GpaRange { start, end });
        } else {
            self.overflowed = true;
        }
        self.conversions += 1;
        Ok(())
    }

    /// How many conversions this map has seen.
    pub fn conversions(&self) -> u64 {
        self.conversions
    }

    /// The ranges converted (either way) since the last call, or `None`
    /// if there were too many to keep (then take all of RAM as converted).
    pub fn take_converted(&mut self) -> Option<Vec<GpaRange>> {
        let converted = std::mem::take(&mut self.converted);
        if std::mem::take(&mut self.overflowed) {
            None
        } else {
            Some(converted)
        }
    }

    /// The shared ranges, ascending.
    pub fn ranges(&self) -> Vec<GpaRange> {
        self.ranges
            .iter()
            .map(|(&start, &end)| GpaRange { start, end })
            .collect()
    }

    /// Shared pages.
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) / PAGE).sum()
    }

    /// Whether the page at `gpa` is shared.
    pub fn is_shared(&self, gpa: u64) -> bool {
        self.ranges
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &e)| gpa < e)
    }

    /// A map from ranges that came from elsewhere (a stream): each must be
    /// well formed, inside `ram`, ascending and disjoint, at most `limit`.
    pub fn from_ranges(
        ram: &[(u64, u64)],
        ranges: &[GpaRange],
        limit: usize,
    ) -> Result<Self, MapError> {
        if ranges.len() > limit {
            return Err(MapError::TooMany(ranges.len(), limit));
        }
        let mut map = SharedMap::default();
        let mut cursor = 0;
        for r in ranges {
            if r.start < cursor {
                return Err(MapError::Unordered(r.start));
            }
            map.set(ram, r.start, r.end, true)?;
            cursor = r.end;
        }
        Ok(map)
    }

    /// The shared pages, as page GPAs, ascending.
    pub fn shared_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|(&start, &end)| (start..end).step_by(PAGE as usize))
    }

    /// The private pages of `ram` (every page not shared), as page GPAs.
    pub fn private_pages(&self, ram: &[(u64, u64)]) -> Vec<u64> {
        let mut out = Vec::new();
        for &(start, len) in ram {
            let mut gpa = start;
            for (&s, &e) in self.ranges.range(start..start + len) {
                out.extend((gpa..s).step_by(PAGE as usize));
                gpa = e;
            }
            out.extend((gpa..start + len).step_by(PAGE as usize));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: [(u64, u64); 2] = [(0, 0x10_0000), (0x1_0000_0000, 0x10_0000)];

    #[test]
    fn sharing_merges_and_privatising_splits() {
        let mut m = SharedMap::default();
        m.set(&RAM, 0x1000, 0x3000, true).unwrap();
        m.set(&RAM, 0x3000, 0x5000, true).unwrap();
        m.set(&RAM, 0x8000, 0x9000, true).unwrap();
        assert_eq!(
            m.ranges(),
            vec![
                GpaRange {
                    start: 0x1000,
                    end: 0x5000
                },
                GpaRange {
                    start: 0x8000,
                    end: 0x9000
                }
            ]
        );
        m.set(&RAM, 0x2000, 0x3000, false).unwrap();
        assert_eq!(m.pages(), 1 + 2 + 1);
        assert!(m.is_shared(0x1000) && !m.is_shared(0x2000) && m.is_shared(0x4fff));
        assert!(!m.is_shared(0x5000));
        let private = m.private_pages(&RAM);
        assert_eq!(private.len() as u64, 2 * 256 - 4);
        assert!(!private.contains(&0x1000) && private.contains(&0x2000));
        assert!(private.contains(&0x1_0000_0000));
        // Every conversion is remembered once, then forgotten.
        assert_eq!(m.take_converted().unwrap().len(), 4);
        assert_eq!(m.take_converted(), Some(vec![]));
        for _ in 0..=MAX_CONVERTED {
            m.set(&RAM, 0x1000, 0x2000, true).unwrap();
        }
        assert_eq!(m.take_converted(), None, "too many: everything");
        assert_eq!(m.take_converted(), Some(vec![]));
    }

    #[test]
    fn bad_ranges_are_refused() {
        let mut m = SharedMap::default();
        assert_eq!(
            m.set(&RAM, 0x1001, 0x2000, true),
            Err(MapError::Malformed(0x1001, 0x2000))
        );
        assert!(m.set(&RAM, 0x2000, 0x2000, true).is_err());
        assert!(m.set(&RAM, 0xff000, 0x101000, true).is_err());
        assert!(m.set(&RAM, 0x2000_0000, 0x2000_1000, true).is_err());
        let r = |start, end| GpaRange { start, end };
        assert_eq!(
            SharedMap::from_ranges(&RAM, &[r(0x3000, 0x4000), r(0x1000, 0x2000)], 8),
            Err(MapError::Unordered(0x1000))
        );
        assert!(SharedMap::from_ranges(&RAM, &[r(0, 0x1000); 9], 8).is_err());
        assert!(SharedMap::from_ranges(&RAM, &[r(0, 0x1000), r(0x1000, 0x2000)], 8).is_ok());
    }

    proptest! {
        /// Against a page-by-page model, whatever the sequence of changes.
        #[test]
        fn the_map_matches_a_page_model(ops in proptest::collection::vec((0u64..64, 1u64..16, any::<bool>()), 0..40)) {
            let ram = [(0u64, 64 * PAGE)];
            let mut m = SharedMap::default();
            let mut model = [false; 64];
            for (first, count, shared) in ops {
                let end = (first + count).min(64);
                m.set(&ram, first * PAGE, end * PAGE, shared).unwrap();
                for p in first..end {
                    model[p as usize] = shared;
                }
            }
            for p in 0..64u64 {
                prop_assert_eq!(m.is_shared(p * PAGE), model[p as usize]);
            }
            let rs = m.ranges();
            for w in rs.windows(2) {
                prop_assert!(w[0].end < w[1].start, "ranges merge when they touch");
            }
            prop_assert_eq!(m.pages() + m.private_pages(&ram).len() as u64, 64);
            prop_assert_eq!(m.shared_pages().count() as u64, m.pages());
            prop_assert!(m.shared_pages().all(|g| m.is_shared(g)));
            prop_assert_eq!(SharedMap::from_ranges(&ram, &rs, 64).unwrap(), m);
        }
    }
}
