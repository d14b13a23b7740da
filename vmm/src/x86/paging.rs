//! Identity page tables with 2 MiB pages (4-level paging).
//!
//! The VMM builds them for the guest: one PML4, one PDPT per 512 GiB, and a
//! page directory for every GiB that holds something to map. Each range
//! carries its own leaf flags: with SEV, private memory is mapped with the
//! C-bit and shared memory (the helper's mailboxes) without it.

use std::collections::BTreeMap;

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// User (CPL3) accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Large page (2 MiB in a PD entry).
pub const PTE_HUGE: u64 = 1 << 7;

use cgsvmm_fw_abi::PAGE_SIZE_U64 as PAGE;
const HUGE_PAGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const PML4_SPAN: u64 = 512 * GIB;

/// Table pages to write: (guest-physical address, 512 entries).
pub type TablePages = Vec<(u64, Box<[u64; 512]>)>;

/// One range to identity-map, and the extra flags of its leaf entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// Flags beyond present and writable on its 2 MiB entries (e.g.
    /// [`PTE_USER`], the C-bit).
    pub leaf: u64,
}

impl Mapping {
    /// `len` bytes from `start` with leaf flags `leaf`.
    pub fn new(start: u64, len: u64, leaf: u64) -> Self {
        Self { start, len, leaf }
    }
}

/// Errors of building tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    /// Two ranges want one 2 MiB page with different flags.
    #[error("The 2 MiB page at {0:#x} is wanted with two different flag sets")]
    Conflict(u64),
    /// The tables need more room than the area the caller gave.
    #[error("Page tables need {needed} pages, only {available} available")]
    NoRoom {
        /// Pages the map needs.
        needed: u64,
        /// Pages the area holds.
        available: u64,
    },
}

/// Builds identity tables mapping every 2 MiB page that overlaps `ranges`,
/// writable, each with its range's leaf flags; `tables` are the extra flags
/// of the entries that point to tables (e.g. [`PTE_USER`], which every
/// level must have for CPL3 access). Table pages are allocated from `area`
/// (start, length); the PML4 is the first page of the area.
pub fn identity_map(
    ranges: &[Mapping],
    area: (u64, u64),
    tables: u64,
) -> Result<TablePages, PagingError> {
    let flags = PTE_PRESENT | PTE_WRITABLE | tables;
    // Collect the 2 MiB pages to map, per GiB, with their leaf flags.
    let mut gibs: BTreeMap<u64, BTreeMap<u64, u64>> = BTreeMap::new();
    for r in ranges {
        if r.len == 0 {
            continue;
        }
        let mut page = r.start & !(HUGE_PAGE - 1);
        while page < r.start + r.len {
            let leaf = PTE_PRESENT | PTE_WRITABLE | PTE_HUGE | r.leaf;
            match gibs.entry(page / GIB).or_default().insert(page, leaf) {
                Some(other) if other != leaf => return Err(PagingError::Conflict(page)),
                _ => {}
            }
            page += HUGE_PAGE;
        }
    }
    let pdpts: Vec<u64> = {
        let mut v: Vec<u64> = gibs.keys().map(|g| g * GIB / PML4_SPAN).collect();
        v.dedup();
        v
    };
    let needed = 1 + pdpts.len() as u64 + gibs.len() as u64;
    let available = area.1 / PAGE;
    if needed > available {
        return Err(PagingError::NoRoom { needed, available });
    }
    let mut next = area.0;
    let mut alloc = || {
        let at = next;
        next += PAGE;
        at
    };
    let pml4_addr = alloc();
    let mut pml4 = Box::new([0u64; 512]);
    let mut pages = Vec::new();
    let mut pdpt_pages: BTreeMap<u64, (u64, Box<[u64; 512]>)> = BTreeMap::new();
    for pdpt_index in pdpts {
        let addr = alloc();
        pml4[pdpt_index as usize] = addr | flags;
        pdpt_pages.insert(pdpt_index, (addr, Box::new([0u64; 512])));
    }
    for (gib, huge_pages) in gibs {
        let pd_addr = alloc();
        let mut pd = Box::new([0u64; 512]);
        for (page, leaf) in huge_pages {
            pd[((page % GIB) / HUGE_PAGE) as usize] = page | leaf;
        }
        let (_, pdpt) = pdpt_pages
            .get_mut(&(gib * GIB / PML4_SPAN))
            .expect("allocated above");
        pdpt[(gib % 512) as usize] = pd_addr | flags;
        pages.push((pd_addr, pd));
    }
    pages.extend(pdpt_pages.into_values());
    pages.insert(0, (pml4_addr, pml4));
    Ok(pages)
}

/// Writes the table pages into guest memory; on failure returns the address
/// that could not be written.
pub fn write_tables(mem: &vm_memory::GuestMemoryMmap, tables: &TablePages) -> Result<(), u64> {
    use vm_memory::{Bytes, GuestAddress};
    for (gpa, table) in tables {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(*gpa))
            .map_err(|_| *gpa)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(start, len)` ranges with `leaf` flags.
    fn ranges(r: &[(u64, u64)], leaf: u64) -> Vec<Mapping> {
        r.iter().map(|&(s, l)| Mapping::new(s, l, leaf)).collect()
    }

    /// Walks the tables like the MMU does: (physical address, flags of all
    /// levels ANDed, leaf entry).
    fn walk(pages: &TablePages, va: u64) -> Option<(u64, u64, u64)> {
        let find = |addr: u64| pages.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
        let pml4 = find(pages[0].0)?;
        let e1 = pml4[((va >> 39) & 511) as usize];
        let pdpt = find(e1 & ADDR).filter(|_| e1 & PTE_PRESENT != 0)?;
        let e2 = pdpt[((va >> 30) & 511) as usize];
        let pd = find(e2 & ADDR).filter(|_| e2 & PTE_PRESENT != 0)?;
        let e3 = pd[((va >> 21) & 511) as usize];
        (e3 & PTE_PRESENT != 0 && e3 & PTE_HUGE != 0).then_some({
            (
                (e3 & 0x000f_ffff_ffe0_0000 & !C_BIT) | (va & 0x1f_ffff),
                e1 & e2 & e3,
                e3,
            )
        })
    }

    fn translate(pages: &TablePages, va: u64) -> Option<(u64, u64)> {
        walk(pages, va).map(|(pa, flags, _)| (pa, flags))
    }

    /// A C-bit position as SEV hosts report it (CPUID 0x8000001f).
    const C_BIT: u64 = 1 << 47;
    /// The address bits of a table pointer (the C-bit is not one).
    const ADDR: u64 = 0x000f_ffff_ffff_f000 & !C_BIT;

    #[test]
    fn private_ranges_carry_the_c_bit_and_shared_ones_do_not() {
        let map = [
            Mapping::new(0, 64 << 20, PTE_USER | C_BIT),
            Mapping::new(0xf800_0000, 4 << 20, PTE_USER | C_BIT),
            Mapping::new(0xf840_0000, 6 << 20, PTE_USER),
            Mapping::new(0xf900_0000, 48 << 20, PTE_USER | C_BIT),
        ];
        let pages = identity_map(&map, (0x1_0000, 0x10_0000), PTE_USER | C_BIT).unwrap();
        for (va, private) in [
            (0x1000, true),
            (0x3ff_f000, true),
            (0xf800_0000, true),
            (0xf83f_ffff, true),
            (0xf840_0000, false),
            (0xf89f_ffff, false),
            (0xf900_0000, true),
            (0xfbff_ffff, true),
        ] {
            let (pa, flags, leaf) = walk(&pages, va).unwrap_or_else(|| panic!("{va:#x} unmapped"));
            assert_eq!(pa, va);
            assert_eq!(leaf & C_BIT != 0, private, "{va:#x}");
            assert_eq!(flags & PTE_USER, PTE_USER);
        }
        assert_eq!(translate(&pages, 0xf8a0_0000), None);
        // Every table pointer is private: the tables themselves are.
        for (_, table) in &pages {
            for e in table
                .iter()
                .filter(|e| **e & PTE_PRESENT != 0 && **e & PTE_HUGE == 0)
            {
                assert_ne!(e & C_BIT, 0);
            }
        }
    }

    #[test]
    fn one_page_wanted_private_and_shared_is_refused() {
        let map = [
            Mapping::new(0xf840_0000, 3 << 20, PTE_USER),
            Mapping::new(0xf860_0000, 2 << 20, PTE_USER | C_BIT),
        ];
        assert_eq!(
            identity_map(&map, (0x1_0000, 0x10_0000), PTE_USER),
            Err(PagingError::Conflict(0xf860_0000))
        );
    }

    #[test]
    fn maps_exactly_the_requested_ranges() {
        let map = ranges(
            &[(0, 256 << 20), (0xfd00_0000, 16 << 20), (4 * GIB, GIB)],
            PTE_USER,
        );
        let pages = identity_map(&map, (0x1_0000, 0x10_0000), PTE_USER).unwrap();
        // PML4 + 1 PDPT + PDs for GiB 0, 3 and 4.
        assert_eq!(pages.len(), 5);
        assert_eq!(pages[0].0, 0x1_0000);
        for va in [
            0,
            0x1234_5678 & 0xfff_ffff,
            0xfd00_1234,
            4 * GIB + 0x42,
            5 * GIB - 1,
        ] {
            let (pa, flags) = translate(&pages, va).unwrap_or_else(|| panic!("{va:#x} unmapped"));
            assert_eq!(pa, va);
            assert_eq!(flags & (PTE_USER | PTE_WRITABLE), PTE_USER | PTE_WRITABLE);
        }
        for va in [256 << 20, 0xfe00_0000, 2 * GIB, 5 * GIB] {
            assert_eq!(translate(&pages, va), None, "{va:#x} should be unmapped");
        }
    }

    #[test]
    fn refuses_an_area_too_small() {
        assert_eq!(
            identity_map(&ranges(&[(0, 2 * GIB)], 0), (0, 2 * PAGE), 0),
            Err(PagingError::NoRoom {
                needed: 4,
                available: 2
            })
        );
    }

    #[test]
    fn supervisor_tables_have_no_user_bit() {
        let pages = identity_map(&ranges(&[(0, GIB)], 0), (0x9000, 0x3000), 0).unwrap();
        let (_, flags) = translate(&pages, 0x20_0000).unwrap();
        assert_eq!(flags & PTE_USER, 0);
    }
}
