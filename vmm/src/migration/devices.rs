//! The devices whose state migrates, and their one state record.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use cgsvmm_devices::cmos::{Cmos, CmosState};
use cgsvmm_devices::fw_cfg::{FwCfg, FwCfgState};
use cgsvmm_devices::serial::{SerialDevice, SerialState};
use cgsvmm_migration::state::{self, Record};
use cgsvmm_migration::VmError;

/// The devices' state, one record.
#[derive(Serialize, Deserialize)]
pub struct DevicesRecord {
    /// COM1.
    pub serial: SerialState,
    /// CMOS/RTC.
    pub cmos: CmosState,
    /// fw_cfg.
    pub fw_cfg: FwCfgState,
}

impl Record for DevicesRecord {
    const NAME: &'static str = "devices";
    const VERSION: u16 = 1;
    const MAX_LEN: usize = 16 << 10;
}

/// The devices whose state migrates (i8042, the debug and lab ports keep
/// none).
#[derive(Clone)]
pub struct MigratableDevices {
    /// COM1.
    pub serial: Arc<SerialDevice>,
    /// CMOS/RTC.
    pub cmos: Arc<Cmos>,
    /// fw_cfg.
    pub fw_cfg: Arc<FwCfg>,
}

impl MigratableDevices {
    /// Their state, as one encoded record.
    pub fn save(&self) -> Result<Vec<u8>, VmError> {
        let record = DevicesRecord {
            serial: self.serial.state(),
            cmos: self.cmos.state(),
            fw_cfg: self.fw_cfg.state(),
        };
        state::encode(&record).map_err(|e| VmError::new("Cannot encode the devices' state", e))
    }

    /// Restores what [`MigratableDevices::save`] encoded; the whole record
    /// is decoded before any device changes.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), VmError> {
        let record: DevicesRecord = state::decode(bytes)
            .map_err(|e| VmError::new("Cannot decode the devices' state", e))?;
        let refused = |e| VmError::new("Cannot restore the devices' state", e);
        self.serial.restore(&record.serial).map_err(refused)?;
        self.cmos.restore(&record.cmos).map_err(refused)?;
        self.fw_cfg.restore(&record.fw_cfg).map_err(refused)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cgsvmm_devices::{BusDevice, EventFdTrigger};
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> MigratableDevices {
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        MigratableDevices {
            serial: Arc::new(SerialDevice::new(irq, Box::new(std::io::sink()))),
            cmos: Arc::new(Cmos::new(256 << 20, 0)),
            fw_cfg: Arc::new(FwCfg::new(None)),
        }
    }

    #[test]
    fn the_devices_record_round_trips_and_refuses_what_it_must() {
        let a = devices();
        // A guest that set the serial port up and typed into its scratch
        // register, picked a CMOS register and an fw_cfg item.
        a.serial.write(3, &[0x83]);
        a.serial.write(0, &[0x0c]);
        a.serial.write(3, &[0x03]);
        a.serial.write(7, &[0x5a]);
        a.cmos.write(0, &[0x34]);
        a.fw_cfg.write(0, &1u16.to_le_bytes());
        let record = DevicesRecord {
            serial: a.serial.state(),
            cmos: a.cmos.state(),
            fw_cfg: a.fw_cfg.state(),
        };
        let bytes = state::encode(&record).unwrap();
        let back: DevicesRecord = state::decode(&bytes).unwrap();
        let b = devices();
        b.serial.restore(&back.serial).unwrap();
        b.cmos.restore(&back.cmos).unwrap();
        b.fw_cfg.restore(&back.fw_cfg).unwrap();
        assert_eq!(b.serial.state(), a.serial.state());
        assert_eq!(b.cmos.state(), a.cmos.state());
        assert_eq!(b.fw_cfg.state(), a.fw_cfg.state());
        let mut scratch = [0u8];
        b.serial.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        // Another version, or past its bound: refused.
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert!(state::decode::<DevicesRecord>(&newer).is_err());
        let mut long = bytes;
        long.resize(DevicesRecord::MAX_LEN + 1, 0);
        assert!(state::decode::<DevicesRecord>(&long).is_err());
    }
}
