//! Guest memory: the physical layout, the host mappings and the memslots.
//!
//! Owns where guest RAM lives (below the 32-bit PCI hole and above 4 GiB),
//! the mirror region that holds the mirror vCPUs' code outside guest RAM,
//! the host mappings behind both (anonymous, `MADV_HUGEPAGE`: first touch of
//! a 4 KiB page costs ~10 µs on the lab host, ~1 µs with huge pages), the
//! memslot tables (the mirror VM's: RAM and the mirror region; the main
//! VM's: the same RAM slots, never the mirror region), and
//! the E820 map the guest is told about (which never names the mirror region).
//!
//! ```text
//! 0                 below_4g_end        3 GiB        4 GiB        4 GiB+above
//! | RAM (slot 0)     |      (unused)     | PCI hole   | RAM (slot 1) |
//!                                        | 0xf800_0000 mirror region (slot 1 or 2)
//!                                        | 0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! ```

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use cgsvmm_fw_abi as abi;

use crate::x86::paging::Mapping;

/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// How much RAM [`Memory::prefault`] backs between two looks at its stop
/// flag (tens of milliseconds here).
pub const PREFAULT_CHUNK: usize = 64 << 20;
/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// Start of the 32-bit PCI/MMIO hole: RAM below 4 GiB ends here at most.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
/// RAM above the hole starts here.
pub const HIGH_RAM_START: u64 = 4 * GIB;
/// Smallest guest we build (the lab boot area alone takes 4 MiB).
pub const MIN_MEMORY: u64 = 16 * MIB;
/// Guest memory is sized in units of this.
pub const MEMORY_GRANULE: u64 = 2 * MIB;

/// E820 entry types (ACPI spec, "Address Range Types").
pub const E820_RAM: u32 = 1;
/// Reserved range.
pub const E820_RESERVED: u32 = 2;

/// Errors of setting up memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("Cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// KVM refused a memslot.
    #[error("Cannot register memslot {slot} at {gpa:#x}: {source}")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A write into guest memory failed (address outside RAM).
    #[error("Guest memory access at {0:#x} failed")]
    Access(u64),
}

/// Where guest RAM lies for a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Total RAM in bytes.
    pub size: u64,
}

impl MemoryLayout {
    /// The layout of `size` bytes of RAM.
    pub fn new(size: u64) -> Self {
        Self { size }
    }

    /// RAM below 4 GiB.
    pub fn below_4g(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// RAM above 4 GiB.
    pub fn above_4g(&self) -> u64 {
        self.size - self.below_4g()
    }

    /// The RAM ranges as (start, length).
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges = vec![(0, self.below_4g())];
        if self.above_4g() > 0 {
            ranges.push((HIGH_RAM_START, self.above_4g()));
        }
        ranges
    }

    /// The RAM ranges as identity mappings with leaf flags `leaf`.
    pub fn ram_mappings(&self, leaf: u64) -> Vec<Mapping> {
        self.ram_ranges()
            .into_iter()
            .map(|(start, len)| Mapping::new(start, len, leaf))
            .collect()
    }

    /// The highest guest-physical address of RAM plus one.
    pub fn ram_end(&self) -> u64 {
        if self.above_4g() > 0 {
            HIGH_RAM_START + self.above_4g()
        } else {
            self.below_4g()
        }
    }

    /// Whether `[gpa, gpa + len)` lies entirely inside guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.ram_ranges()
            .iter()
            .any(|&(start, size)| gpa >= start && end <= start + size)
    }

    /// The E820 map for a guest that boots through the BIOS-style path:
    /// conventional memory up to the EBDA (which holds the MP table), then
    /// RAM from 1 MiB. The mirror region is deliberately absent.
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut map = vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
            (0x10_0000, self.below_4g() - 0x10_0000, E820_RAM),
        ];
        if self.above_4g() > 0 {
            map.push((HIGH_RAM_START, self.above_4g(), E820_RAM));
        }
        map
    }
}

// The mirror region lies in the PCI hole, never in RAM.
const _: () = assert!(
    abi::MIRROR_REGION_GPA >= MMIO_HOLE_START
        && abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE <= HIGH_RAM_START
);

/// Start of the extended BIOS data area (where the MP table goes).
pub const EBDA_START: u64 = 0x9_fc00;

/// One memslot, registered identically in every VM over the same memory.
/// Only [`slots_of`] makes one, from a live mapping, and nothing changes it
/// after: its host address is that mapping's and never leaves it except to
/// KVM (through the `unsafe` registrations, whose callers keep the mapping
/// alive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    slot: u32,
    /// Guest-physical base.
    gpa: u64,
    /// Length in bytes.
    size: u64,
    /// Host virtual address of the first byte.
    host_addr: u64,
    /// The guest may not write it (firmware ROM).
    read_only: bool,
}

impl MemSlot {
    /// Its KVM slot number.
    pub fn number(&self) -> u32 {
        self.slot
    }

    /// Its guest-physical base.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the guest may not write it (firmware ROM).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The host address of `len` bytes at `gpa`, if they lie in this slot
    /// (for KVM commands over guest memory, such as SEV's launch).
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<u64> {
        let offset = gpa.checked_sub(self.gpa)?;
        (offset.checked_add(len)? <= self.size).then(|| self.host_addr + offset)
    }

    /// Registers the slot in `vm`, with dirty logging when asked.
    ///
    /// # Safety
    ///
    /// The mapping the slot was made from ([`slots_of`]) must stay mapped
    /// for as long as `vm` exists (or until the slot is registered
    /// again over the same memory): KVM reads and writes it on the
    /// guest's behalf meanwhile.
    pub unsafe fn register(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        let mut flags = 0;
        if self.read_only {
            flags |= KVM_MEM_READONLY;
        }
        if log_dirty && !self.read_only {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        };
        // SAFETY: host_addr..host_addr+size is the mapping the slot was
        // made from, which the caller keeps alive as long as the VM.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Memslot {
            slot: self.slot,
            gpa: self.gpa,
            source,
        })
    }
}

/// Maps `ranges` (start, length) as anonymous memory and asks for huge pages.
pub fn map_ranges(ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = ranges
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)?;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Access(region.start_addr().0))?;
        // SAFETY: advice only; the range is the region's own live mapping.
        let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

/// The memslots of `mem`, numbered from `first_slot`.
pub fn slots_of(mem: &GuestMemoryMmap, first_slot: u32, read_only: bool) -> Vec<MemSlot> {
    mem.iter()
        .enumerate()
        .map(|(i, region)| MemSlot {
            slot: first_slot + i as u32,
            gpa: region.start_addr().0,
            size: region.len(),
            host_addr: region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 of a mapped region is valid") as u64,
            read_only,
        })
        .collect()
}

/// Guest memory: RAM plus the mirror region, each with its own mapping.
pub struct Memory {
    /// The guest's RAM layout.
    pub layout: MemoryLayout,
    /// Guest RAM.
    pub ram: GuestMemoryMmap,
    /// The mirror region (outside RAM, not in the E820).
    pub mirror: GuestMemoryMmap,
}

impl Memory {
    /// SHA-256 over guest RAM, region after region, as hex (tests compare
    /// a source's and a target's).
    pub fn ram_digest(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        for region in self.ram.iter() {
            let start = region.start_addr().0;
            let len = region.len();
            let mut at = 0;
            while at < len {
                let n = usize::try_from(len - at).map_or(buf.len(), |left| left.min(buf.len()));
                if self
                    .ram
                    .read_slice(&mut buf[..n], GuestAddress(start + at))
                    .is_err()
                {
                    break;
                }
                ctx.update(&buf[..n]);
                at += n as u64;
            }
        }
        hex::encode(ctx.finish().as_ref())
    }

    /// Maps `size` bytes of RAM and the mirror region.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let layout = MemoryLayout::new(size);
        let ram = map_ranges(&layout.ram_ranges())?;
        let mirror = map_ranges(&[(abi::MIRROR_REGION_GPA, abi::MIRROR_REGION_SIZE)])?;
        Ok(Self {
            layout,
            ram,
            mirror,
        })
    }

    /// Backs all of guest RAM with host memory now (MADV_POPULATE_WRITE):
    /// an incoming VM does this while it waits, so that the first write of
    /// each page during the migration does not fault (on the lab host a
    /// first touch costs more than the page's decryption). Contents are
    /// left alone; racing writes are fine. Works in [`PREFAULT_CHUNK`]s and
    /// gives up between two once `stop` is set. Returns how long it took.
    pub fn prefault(&self, stop: &std::sync::atomic::AtomicBool) -> std::time::Duration {
        let began = std::time::Instant::now();
        for region in self.ram.iter() {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let len = region.len() as usize;
            for at in (0..len).step_by(PREFAULT_CHUNK) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return began.elapsed();
                }
                // SAFETY: the range is inside the region's own live
                // anonymous mapping; populating it changes no byte of it.
                let ret = unsafe {
                    libc::madvise(
                        host.add(at).cast(),
                        PREFAULT_CHUNK.min(len - at),
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if ret != 0 {
                    log::debug!(
                        "madvise(MADV_POPULATE_WRITE) failed: {}",
                        std::io::Error::last_os_error()
                    );
                    return began.elapsed();
                }
            }
        }
        began.elapsed()
    }

    /// The mirror VM's memslots: RAM, then the mirror region.
    pub fn slots(&self) -> Vec<MemSlot> {
        let mut slots = self.main_slots();
        let next = slots.len() as u32;
        slots.extend(slots_of(&self.mirror, next, false));
        slots
    }

    /// The main VM's memslots: RAM only, numbered as in [`Memory::slots`].
    /// The mirror region (the helper's code, its key, its counters and the
    /// mailboxes) is never mapped into the main VM, so nothing the guest
    /// runs can read or write it.
    pub fn main_slots(&self) -> Vec<MemSlot> {
        slots_of(&self.ram, 0, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_guest_is_all_below_the_hole() {
        let l = MemoryLayout::new(256 * MIB);
        assert_eq!(l.ram_ranges(), vec![(0, 256 * MIB)]);
        assert_eq!(l.ram_end(), 256 * MIB);
        assert!(l.contains(0x1000, 0x1000));
        assert!(!l.contains(256 * MIB - 8, 16));
        assert!(!l.contains(u64::MAX, 2));
        assert_eq!(
            l.e820(),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x10_0000, 255 * MIB, 1)
            ]
        );
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        let l = MemoryLayout::new(5 * GIB);
        assert_eq!(l.ram_ranges(), vec![(0, 3 * GIB), (4 * GIB, 2 * GIB)]);
        assert_eq!(l.ram_end(), 6 * GIB);
        assert!(!l.contains(3 * GIB, 8));
        assert!(l.contains(4 * GIB, 8));
        let e820 = l.e820();
        assert_eq!(e820.last(), Some(&(4 * GIB, 2 * GIB, 1)));
        // Neither the hole nor the mirror region is RAM.
        for (start, len, kind) in e820 {
            if kind == E820_RAM {
                assert!(start + len <= MMIO_HOLE_START || start >= HIGH_RAM_START);
            }
        }
    }

    #[test]
    fn a_slot_gives_host_addresses_only_inside_itself() {
        let mem = map_ranges(&[(0x10_0000, 2 * MIB)]).unwrap();
        let slot = slots_of(&mem, 0, false)[0];
        let base = slot.host_range(0x10_0000, 0).unwrap();
        assert_eq!(slot.host_range(0x10_1000, 4096), Some(base + 0x1000));
        assert_eq!(slot.host_range(0x10_0000, 2 * MIB), Some(base));
        assert_eq!(slot.host_range(0x10_0000, 2 * MIB + 1), None);
        assert_eq!(slot.host_range(0xf_f000, 4096), None);
        assert_eq!(slot.host_range(0x10_0000 + 2 * MIB, 1), None);
        assert_eq!(slot.host_range(u64::MAX, 2), None);
    }

    #[test]
    fn slots_cover_ram_then_the_mirror_region() {
        let mem = Memory::new(32 * MIB).unwrap();
        // The main VM's: RAM alone, nothing of the mirror region.
        let main = mem.main_slots();
        assert_eq!(main.len(), 1);
        let mirror = abi::MIRROR_REGION_GPA..abi::MIRROR_REGION_GPA + abi::MIRROR_REGION_SIZE;
        assert!(main
            .iter()
            .all(|s| s.gpa() + s.size() <= mirror.start || s.gpa() >= mirror.end));
        let slots = mem.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(
            (slots[0].number(), slots[0].gpa(), slots[0].size()),
            (0, 0, 32 * MIB)
        );
        assert_eq!(
            (slots[1].number(), slots[1].gpa()),
            (1, abi::MIRROR_REGION_GPA)
        );
        // The host address is the mapping itself.
        mem.ram
            .write_obj(0xdead_beefu64, GuestAddress(0x1000))
            .unwrap();
        // SAFETY: slot 0 maps 32 MiB starting at host_addr.
        let v = unsafe { *((slots[0].host_addr + 0x1000) as *const u64) };
        assert_eq!(v, 0xdead_beef);
    }
}
