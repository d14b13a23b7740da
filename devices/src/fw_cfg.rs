//! QEMU's fw_cfg interface (docs/specs/fw_cfg.rst in QEMU), the way OVMF and
//! SeaBIOS find the kernel, command line, E820 map and named files.
//!
//! Ports (x86): selector 0x510 (16-bit write), data 0x511 (8-bit read,
//! auto-incrementing offset), DMA address 0x514 (64-bit big-endian, written as
//! two 32-bit halves; writing the low half at 0x518 starts the transfer).
//!
//! ```text
//! guest                                   FwCfg
//!  | out16 0x510, key     --------------> | select item, offset = 0
//!  | in8 0x511 (n times)  <-------------- | item bytes, then zeros
//!  | out32 0x514, be(hi) ; out32 0x518, be(lo) --> DMA: read FwCfgDmaAccess
//!  |                                      | at addr; select/skip/read;
//!  |                      <-------------- | write control back (0 or ERROR)
//! ```
//!
//! Items are read-only: the guest cannot write any of them. So the state to
//! migrate is the three latches (selector, read offset, high half of the DMA
//! address); the target rebuilds the items from its own configuration, and a
//! DMA transfer runs to completion inside the port write that starts it, so
//! none is ever in flight when the state is taken.

use std::collections::BTreeMap;
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{BusDevice, DeviceStateError};

/// Selector port.
pub const FW_CFG_PORT_BASE: u64 = 0x510;
/// Selector, data, a hole and the 8-byte DMA address register.
pub const FW_CFG_PORT_LEN: u64 = 0xc;
const DATA_OFFSET: u64 = 1;
const DMA_HIGH_OFFSET: u64 = 4;
const DMA_LOW_OFFSET: u64 = 8;

/// Well-known item keys.
pub mod keys {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Feature bitmap: bit 0 traditional interface, bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// RAM size in bytes (u64).
    pub const RAM_SIZE: u16 = 0x03;
    /// Number of boot CPUs (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Maximum number of CPUs (u16).
    pub const MAX_CPUS: u16 = 0x0f;
    /// Size of the kernel image without its setup header (u32).
    pub const KERNEL_SIZE: u16 = 0x08;
    /// Size of the initrd (u32).
    pub const INITRD_SIZE: u16 = 0x0b;
    /// The kernel image without its setup header.
    pub const KERNEL_DATA: u16 = 0x11;
    /// The initrd.
    pub const INITRD_DATA: u16 = 0x12;
    /// Size of the command line including its NUL (u32).
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// The command line, NUL-terminated.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// Size of the bzImage setup sectors (u32).
    pub const SETUP_SIZE: u16 = 0x17;
    /// The bzImage setup sectors.
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// Key of the first named file.
    pub const FILE_FIRST: u16 = 0x20;
}

/// Feature bits of the ID item.
const FEATURE_TRADITIONAL: u32 = 1;
const FEATURE_DMA: u32 = 2;
/// What a read of the DMA register returns: "QEMU CFG".
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// Longest file name, including its NUL.
const FILE_NAME_LEN: usize = 56;
/// Largest single DMA transfer we honour (a kernel or initrd fits).
const MAX_DMA_LEN: u32 = 1 << 30;

const DMA_CTL_ERROR: u32 = 0x01;
const DMA_CTL_READ: u32 = 0x02;
const DMA_CTL_SKIP: u32 = 0x04;
const DMA_CTL_SELECT: u32 = 0x08;
const DMA_CTL_WRITE: u32 = 0x10;

/// Errors of building the item set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// File name empty or too long.
    #[error("Invalid fw_cfg file name {0:?}")]
    InvalidName(String),
    /// A file with this name exists.
    #[error("Duplicate fw_cfg file {0:?}")]
    Duplicate(String),
    /// Too many files.
    #[error("Too many fw_cfg files")]
    Full,
}

struct Latches {
    selector: u16,
    offset: usize,
    dma_high: u32,
}

/// The fw_cfg device.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    latches: Mutex<Latches>,
    memory: Option<GuestMemoryMmap>,
    /// Guest memory this device wrote (DMA) since the last
    /// [`FwCfg::take_written`]: KVM's dirty log does not see the VMM's own
    /// writes, and a migration must send these pages again.
    written: Mutex<Vec<(u64, u64)>>,
}

/// The guest-set latches, and the length of the selected item so the target
/// can tell whether it holds the same one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FwCfgState {
    /// The selected key (any 16-bit value: the guest may select keys that
    /// name no item, and then reads zeros).
    pub selector: u16,
    /// Read position in the selected item; past its end when the guest has
    /// read past it (it reads zeros there).
    pub offset: u64,
    /// The high half of the DMA address, latched until the low half is
    /// written.
    pub dma_address_high: u32,
    /// Length of the selected item on the source; `None` when the selector
    /// named no item there.
    pub selected_len: Option<u64>,
}

impl FwCfg {
    /// A device with the signature and ID items; `memory` enables DMA.
    pub fn new(memory: Option<GuestMemoryMmap>) -> Self {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        let features = FEATURE_TRADITIONAL | if memory.is_some() { FEATURE_DMA } else { 0 };
        items.insert(keys::ID, features.to_le_bytes().to_vec());
        let mut dev = Self {
            items,
            files: Vec::new(),
            latches: Mutex::new(Latches {
                selector: 0,
                offset: 0,
                dma_high: 0,
            }),
            memory,
            written: Mutex::new(Vec::new()),
        };
        dev.rebuild_directory();
        dev
    }

    /// Sets a numbered item.
    /// The guest memory ranges (gpa, length) DMA wrote since the last
    /// call, for a migration's dirty pages.
    pub fn take_written(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.written.lock().expect("fw_cfg lock poisoned"))
    }

    fn note_written(&self, gpa: u64, len: u64) {
        let mut w = self.written.lock().expect("fw_cfg lock poisoned");
        // Bounded: a guest that loops on DMA merges into one range.
        if w.len() >= 4096 {
            let (lo, hi) = w.iter().fold((gpa, gpa + len), |(lo, hi), &(g, l)| {
                (lo.min(g), hi.max(g + l))
            });
            w.clear();
            w.push((lo, hi - lo));
        } else {
            w.push((gpa, len));
        }
    }

    pub fn set_item(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// Adds a named file (e.g. "etc/e820") and returns its key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::InvalidName(name.to_string()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        let key = keys::FILE_FIRST
            .checked_add(u16::try_from(self.files.len()).map_err(|_| FwCfgError::Full)?)
            .filter(|k| *k < 0x4000)
            .ok_or(FwCfgError::Full)?;
        self.items.insert(key, data);
        self.files.push((name.to_string(), key));
        self.rebuild_directory();
        Ok(key)
    }

    /// Directory: be32 count, then per file be32 size, be16 key, u16 0,
    /// name[56], sorted by name as QEMU does.
    fn rebuild_directory(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in files {
            let size = self.items.get(&key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FILE_NAME_LEN];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.items.insert(keys::FILE_DIR, dir);
    }

    /// The bytes of the selected item from `offset` on (empty when unknown).
    fn item_tail(&self, selector: u16, offset: usize) -> &[u8] {
        self.items
            .get(&selector)
            .map_or(&[], |d| d.get(offset..).unwrap_or(&[]))
    }

    fn item_len(&self, key: u16) -> Option<u64> {
        self.items.get(&key).map(|d| d.len() as u64)
    }

    /// The latches, for migration.
    pub fn state(&self) -> FwCfgState {
        let latches = self.latches.lock().expect("fw_cfg lock poisoned");
        FwCfgState {
            selector: latches.selector,
            offset: latches.offset as u64,
            dma_address_high: latches.dma_high,
            selected_len: self.item_len(latches.selector),
        }
    }

    /// Takes on `state` (from [`FwCfg::state`] on the source), into a device
    /// the target built with the same items. Refuses a state whose selected
    /// item this device holds with another length, or not at all (or holds
    /// when the source did not): the guest may be part-way through reading
    /// it, and would go on reading something else. On error the device is
    /// unchanged.
    pub fn restore(&self, state: &FwCfgState) -> Result<(), DeviceStateError> {
        let offset = usize::try_from(state.offset).map_err(|_| DeviceStateError::InvalidValue {
            device: "fw_cfg",
            field: "offset",
            value: state.offset,
            expected: "more than this host can address",
        })?;
        let ours = self.item_len(state.selector);
        if ours != state.selected_len {
            let describe = |len: Option<u64>| match len {
                Some(n) => format!("{n} bytes"),
                None => "absent".to_string(),
            };
            return Err(DeviceStateError::Mismatch {
                device: "fw_cfg",
                detail: format!(
                    "selected item {:#x} is {} here, {} on the source",
                    state.selector,
                    describe(ours),
                    describe(state.selected_len)
                ),
            });
        }
        let mut latches = self.latches.lock().expect("fw_cfg lock poisoned");
        *latches = Latches {
            selector: state.selector,
            offset,
            dma_high: state.dma_address_high,
        };
        Ok(())
    }

    /// Runs the DMA request whose descriptor is at `addr`; returns the
    /// control word to write back.
    fn dma(&self, latches: &mut Latches, addr: u64) -> u32 {
        let Some(mem) = self.memory.as_ref() else {
            return DMA_CTL_ERROR;
        };
        let mut desc = [0u8; 16];
        if mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            return DMA_CTL_ERROR;
        }
        let control = u32::from_be_bytes(desc[0..4].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(desc[4..8].try_into().expect("4 bytes"));
        let target = u64::from_be_bytes(desc[8..16].try_into().expect("8 bytes"));
        if control & DMA_CTL_SELECT != 0 {
            latches.selector = (control >> 16) as u16;
            latches.offset = 0;
        }
        let result = if control & DMA_CTL_WRITE != 0 || length > MAX_DMA_LEN {
            DMA_CTL_ERROR
        } else if control & DMA_CTL_READ != 0 {
            let tail = self.item_tail(latches.selector, latches.offset);
            let n = tail.len().min(length as usize);
            let mut buf = tail[..n].to_vec();
            // Past the end of an item the guest reads zeros.
            buf.resize(length as usize, 0);
            if mem.write_slice(&buf, GuestAddress(target)).is_err() {
                DMA_CTL_ERROR
            } else {
                self.note_written(target, length.into());
                latches.offset = latches.offset.saturating_add(length as usize);
                0
            }
        } else {
            if control & DMA_CTL_SKIP != 0 {
                latches.offset = latches.offset.saturating_add(length as usize);
            }
            0
        };
        // Write back the control word (0 = done, or ERROR).
        if mem
            .write_slice(&result.to_be_bytes(), GuestAddress(addr))
            .is_err()
        {
            log::warn!("fw_cfg: cannot complete DMA descriptor at {addr:#x}");
        } else {
            self.note_written(addr, 4);
        }
        result
    }
}

impl BusDevice for FwCfg {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut latches = self.latches.lock().expect("fw_cfg lock poisoned");
        match offset {
            DATA_OFFSET => {
                for b in data.iter_mut() {
                    *b = self
                        .item_tail(latches.selector, latches.offset)
                        .first()
                        .copied()
                        .unwrap_or(0);
                    latches.offset = latches.offset.saturating_add(1);
                }
            }
            DMA_HIGH_OFFSET..=11 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                let start = (offset - DMA_HIGH_OFFSET) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(start + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut latches = self.latches.lock().expect("fw_cfg lock poisoned");
        match (offset, data.len()) {
            (0, 2) => {
                latches.selector = u16::from_le_bytes([data[0], data[1]]);
                latches.offset = 0;
            }
            (DMA_HIGH_OFFSET, 4) => {
                latches.dma_high = u32::from_be_bytes(data.try_into().expect("4 bytes"));
            }
            (DMA_LOW_OFFSET, 4) => {
                let low = u32::from_be_bytes(data.try_into().expect("4 bytes"));
                let addr = u64::from(latches.dma_high) << 32 | u64::from(low);
                latches.dma_high = 0;
                self.dma(&mut latches, addr);
            }
            // Writes to the data port are ignored (items are read-only).
            _ => log::debug!(
                "fw_cfg: ignored {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

/// The `etc/e820` file: packed {u64 addr, u64 len, u32 type} entries.
pub fn e820_file(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 20);
    for (addr, len, kind) in entries {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(dev: &FwCfg, key: u16) {
        dev.write(0, &key.to_le_bytes());
    }

    fn read_bytes(dev: &FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                dev.read(DATA_OFFSET, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_id_and_directory() {
        let mut dev = FwCfg::new(None);
        select(&dev, keys::SIGNATURE);
        assert_eq!(read_bytes(&dev, 4), b"QEMU");
        select(&dev, keys::ID);
        assert_eq!(read_bytes(&dev, 4), FEATURE_TRADITIONAL.to_le_bytes());
        dev.add_file("etc/zz", vec![1, 2, 3]).unwrap();
        let k = dev
            .add_file("etc/e820", e820_file(&[(0, 0x9fc00, 1)]))
            .unwrap();
        assert_eq!(
            dev.add_file("etc/e820", vec![]),
            Err(FwCfgError::Duplicate("etc/e820".into()))
        );
        assert!(matches!(
            dev.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::InvalidName(_))
        ));
        select(&dev, keys::FILE_DIR);
        let dir = read_bytes(&dev, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[0..4].try_into().unwrap()), 2);
        // Sorted by name: etc/e820 first.
        assert_eq!(u32::from_be_bytes(dir[4..8].try_into().unwrap()), 20);
        assert_eq!(u16::from_be_bytes(dir[8..10].try_into().unwrap()), k);
        assert_eq!(&dir[12..20], b"etc/e820");
        assert_eq!(&dir[68 + 8..68 + 14], b"etc/zz");
        // Reading past the end gives zeros; reselecting rewinds.
        select(&dev, k);
        let data = read_bytes(&dev, 22);
        assert_eq!(&data[8..16], &0x9fc00u64.to_le_bytes());
        assert_eq!(&data[20..], &[0, 0]);
        // The guest cannot write items.
        dev.write(DATA_OFFSET, &[9]);
        select(&dev, keys::SIGNATURE);
        assert_eq!(read_bytes(&dev, 4), b"QEMU");
    }

    #[test]
    fn dma_select_skip_read_and_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut dev = FwCfg::new(Some(mem.clone()));
        dev.set_item(keys::CMDLINE_DATA, b"console=ttyS0\0".to_vec());
        let dma = |control: u32, len: u32, target: u64| {
            let mut desc = control.to_be_bytes().to_vec();
            desc.extend_from_slice(&len.to_be_bytes());
            desc.extend_from_slice(&target.to_be_bytes());
            mem.write_slice(&desc, GuestAddress(0x100)).unwrap();
            dev.write(DMA_HIGH_OFFSET, &0u32.to_be_bytes());
            dev.write(DMA_LOW_OFFSET, &0x100u32.to_be_bytes());
            let mut ctl = [0u8; 4];
            mem.read_slice(&mut ctl, GuestAddress(0x100)).unwrap();
            u32::from_be_bytes(ctl)
        };
        let sel = u32::from(keys::CMDLINE_DATA) << 16 | DMA_CTL_SELECT;
        assert_eq!(dma(sel | DMA_CTL_SKIP, 8, 0), 0);
        assert_eq!(dma(DMA_CTL_READ, 8, 0x200), 0);
        let mut out = [0u8; 8];
        mem.read_slice(&mut out, GuestAddress(0x200)).unwrap();
        assert_eq!(&out, b"ttyS0\0\0\0");
        assert_eq!(dma(DMA_CTL_WRITE, 4, 0x200), DMA_CTL_ERROR);
        // Target outside guest memory fails without touching anything.
        assert_eq!(dma(sel | DMA_CTL_READ, 4, 0xffff_0000), DMA_CTL_ERROR);
        let mut sig = [0u8; 4];
        dev.read(DMA_HIGH_OFFSET, &mut sig);
        assert_eq!(&sig, b"QEMU");
        dev.read(DMA_LOW_OFFSET, &mut sig);
        assert_eq!(&sig, b" CFG");
        let mut id = [0u8; 4];
        select(&dev, keys::ID);
        dev.read(DATA_OFFSET, &mut id[..1]);
        assert_eq!(id[0], (FEATURE_TRADITIONAL | FEATURE_DMA) as u8);
        // Every page DMA wrote (data and descriptors) is known, once: a
        // migration sends them again.
        let written = dev.take_written();
        assert!(
            written.iter().any(|&(g, l)| g == 0x200 && l == 8),
            "{written:?}"
        );
        assert!(written.iter().any(|&(_, l)| l == 4), "{written:?}");
        assert!(dev.take_written().is_empty());
    }

    /// Guest memory with a page above 4 GiB, so the DMA high latch counts.
    const HIGH: u64 = 1 << 32;

    fn with_file(len: usize) -> (FwCfg, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(HIGH), 0x1000),
        ])
        .unwrap();
        let mut dev = FwCfg::new(Some(mem.clone()));
        dev.set_item(keys::CMDLINE_DATA, b"console=ttyS0\0".to_vec());
        dev.add_file("etc/test", (0..len).map(|i| i as u8).collect())
            .unwrap();
        (dev, mem)
    }

    /// Drives `dev` through its ports part-way into etc/test, with the high
    /// half of a DMA address latched.
    fn drive(dev: &FwCfg) {
        select(dev, keys::FILE_FIRST);
        assert_eq!(read_bytes(dev, 10), (0..10).collect::<Vec<u8>>());
        dev.write(DMA_HIGH_OFFSET, &1u32.to_be_bytes());
    }

    /// What the guest sees: more data-port bytes, then a DMA read started by
    /// writing only the low half of the address, then the data port again.
    fn observe(dev: &FwCfg, mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut seen = read_bytes(dev, 5);
        let mut desc = DMA_CTL_READ.to_be_bytes().to_vec();
        desc.extend_from_slice(&8u32.to_be_bytes());
        desc.extend_from_slice(&(HIGH + 0x200).to_be_bytes());
        mem.write_slice(&desc, GuestAddress(HIGH + 0x100)).unwrap();
        dev.write(DMA_LOW_OFFSET, &0x100u32.to_be_bytes());
        let mut out = [0u8; 12];
        mem.read_slice(&mut out[..4], GuestAddress(HIGH + 0x100))
            .unwrap();
        mem.read_slice(&mut out[4..], GuestAddress(HIGH + 0x200))
            .unwrap();
        seen.extend_from_slice(&out);
        seen.extend(read_bytes(dev, 3));
        seen
    }

    #[test]
    fn restored_fw_cfg_behaves_like_the_source() {
        let (src, src_mem) = with_file(100);
        drive(&src);
        let state = src.state();
        assert_eq!(
            state,
            FwCfgState {
                selector: keys::FILE_FIRST,
                offset: 10,
                dma_address_high: 1,
                selected_len: Some(100),
            }
        );
        let (dst, dst_mem) = with_file(100);
        dst.restore(&state).unwrap();
        assert_eq!(dst.state(), state);
        let seen = observe(&src, &src_mem);
        assert_eq!(observe(&dst, &dst_mem), seen);
        // Bytes 10..15, DMA done (control 0) with bytes 15..23, then 23..26.
        let mut expected: Vec<u8> = (10..15).collect();
        expected.extend_from_slice(&[0, 0, 0, 0]);
        expected.extend(15..26);
        assert_eq!(seen, expected);
    }

    #[test]
    fn unknown_selectors_and_offsets_past_the_end_round_trip() {
        let (src, _mem) = with_file(4);
        select(&src, 0x0e); // no such item: the guest reads zeros
        read_bytes(&src, 3);
        let (dst, _mem) = with_file(4);
        dst.restore(&src.state()).unwrap();
        assert_eq!(dst.state().offset, 3);
        select(&src, keys::FILE_FIRST);
        read_bytes(&src, 6);
        dst.restore(&src.state()).unwrap();
        assert_eq!(read_bytes(&dst, 2), [0, 0]);
        assert_eq!(dst.state().offset, 8);
    }

    #[test]
    fn a_state_from_another_configuration_is_refused_and_changes_nothing() {
        let (src, _mem) = with_file(100);
        drive(&src);
        let state = src.state();
        let (dst, _mem) = with_file(99);
        select(&dst, keys::CMDLINE_DATA);
        read_bytes(&dst, 2);
        let before = dst.state();
        let refused = |dev: &FwCfg, bad: &FwCfgState, needle: &str| {
            let err = dev.restore(bad).unwrap_err();
            assert!(matches!(
                err,
                DeviceStateError::Mismatch {
                    device: "fw_cfg",
                    ..
                }
            ));
            assert!(err.to_string().contains(needle), "{err}");
        };
        // The selected file is shorter here.
        refused(
            &dst,
            &state,
            "item 0x20 is 99 bytes here, 100 bytes on the source",
        );
        // Or absent here, or absent there.
        refused(
            &dst,
            &FwCfgState {
                selector: 0x21,
                ..state.clone()
            },
            "item 0x21 is absent here",
        );
        refused(
            &dst,
            &FwCfgState {
                selected_len: None,
                ..state.clone()
            },
            "absent on the source",
        );
        assert_eq!(dst.state(), before);
        assert_eq!(read_bytes(&dst, 3), b"nso");
    }
}
