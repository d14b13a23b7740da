//! The port I/O bus: a map from address ranges to devices.
//!
//! Built once before any vCPU runs and then shared read-only by every vCPU
//! thread; devices keep their own state behind their own locks, so two vCPUs
//! touching two devices never wait on each other.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A device on the bus. `offset` is relative to the base the device was
/// inserted at; `data` is the access width (1, 2 or 4 bytes for port I/O).
pub trait BusDevice: Send + Sync {
    /// Fills `data` from the device.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Hands `data` to the device.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors of [`Bus::insert`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length or wrapping range.
    #[error("Invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// Address ranges → devices.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<dyn BusDevice>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &Arc<dyn BusDevice>)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, &entry.device))
    }

    /// Reads from the device at `addr`; returns false (and all-ones data, as
    /// an unclaimed ISA bus does) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 4).unwrap();
        assert!(bus.write(0x3f8 + 5, &[7]));
        assert!(bus.write(0x403, &[1, 2]));
        assert!(!bus.write(0x404, &[1]));
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(*a.0.lock().unwrap(), vec![(5, vec![7])]);
        assert_eq!(*b.0.lock().unwrap(), vec![(3, vec![1, 2])]);
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2, 2]);
        assert!(!bus.read(0x500, &mut data));
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev: Arc<dyn BusDevice> = Arc::new(Recorder::default());
        bus.insert(dev.clone(), 0x10, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x18, 1),
            Err(BusError::Overlap { base: 0x18, len: 1 })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x8, 0x9),
            Err(BusError::Overlap {
                base: 0x8,
                len: 0x9
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x0, 0x20),
            Err(BusError::Overlap { base: 0, len: 0x20 })
        );
        assert!(bus.insert(dev.clone(), 0x8, 0x8).is_ok());
        assert!(bus.insert(dev.clone(), 0x20, 1).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), 0x30, 0),
            Err(BusError::InvalidRange { base: 0x30, len: 0 })
        );
        assert!(matches!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
