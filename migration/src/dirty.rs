//! Dirty bitmaps (KVM_GET_DIRTY_LOG: one bit per 4 KiB page, little-endian
//! u64 words) as ranges of pages, which is what senders iterate over.

/// A run of consecutive dirty pages: `[first, first + count)` page indices
/// relative to the start of the memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First page index.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
}

/// The dirty runs of `bitmap`, limited to `pages` pages (the slot's size;
/// bits past it are ignored).
pub fn ranges(bitmap: &[u64], pages: u64) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = u64::from(bits.trailing_zeros());
            let page = w as u64 * 64 + bit;
            if page >= pages {
                return out;
            }
            match out.last_mut() {
                Some(r) if r.first + r.count == page => r.count += 1,
                _ => out.push(PageRange {
                    first: page,
                    count: 1,
                }),
            }
            bits &= bits - 1;
        }
    }
    out
}

/// Number of dirty pages in `bitmap` within `pages`.
pub fn count(bitmap: &[u64], pages: u64) -> u64 {
    ranges(bitmap, pages).iter().map(|r| r.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_across_words() {
        // Pages 1-2, 62-66 (crossing a word), 130.
        let bitmap = [0b110 | (0b11 << 62), 0b111, 1 << 2];
        assert_eq!(
            ranges(&bitmap, 192),
            vec![
                PageRange { first: 1, count: 2 },
                PageRange {
                    first: 62,
                    count: 5
                },
                PageRange {
                    first: 130,
                    count: 1
                },
            ]
        );
        assert_eq!(count(&bitmap, 192), 8);
    }

    #[test]
    fn bits_past_the_slot_are_ignored() {
        assert_eq!(
            ranges(&[u64::MAX], 10),
            vec![PageRange {
                first: 0,
                count: 10
            }]
        );
        assert!(ranges(&[0, 0], 128).is_empty());
        assert!(ranges(&[1 << 5], 5).is_empty());
    }
}
