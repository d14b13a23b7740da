//! CMOS RAM and the MC146818 real-time clock (index port 0x70, data 0x71).
//!
//! The clock reads the host's wall clock (UTC) at every access, in BCD and
//! 24-hour mode; the memory-size bytes are the ones firmware (SeaBIOS, OVMF)
//! reads to size RAM.
//!
//! The guest cannot set the clock (writes to the time and status registers
//! are ignored), so there is no offset from the host clock to migrate: the
//! state is the index register and the RAM, and a restored RTC reads the
//! target host's clock, as the source's read its own.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{BusDevice, DeviceStateError};

/// Index port; the data port is the next one.
pub const CMOS_PORT_BASE: u64 = 0x70;
/// Index and data ports.
pub const CMOS_PORT_LEN: u64 = 2;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// Bytes of CMOS RAM (the MC146818's 128, clock registers included).
pub const CMOS_RAM_LEN: usize = 128;
/// Highest index: bit 7 of an index write is the NMI mask.
const INDEX_MASK: u8 = 0x7f;
/// Status B: 24-hour mode, BCD (DM bit clear).
const STATUS_B_24H: u8 = 0x02;
/// Status A: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status D: the RAM and time are valid (battery good).
const STATUS_D_VRT: u8 = 0x80;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A calendar date and time of day in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year (e.g. 2026).
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 (Sunday) ..= 7, as the RTC counts.
    pub weekday: u32,
}

impl DateTime {
    /// The UTC date of `secs` seconds after the Unix epoch (civil-from-days).
    pub fn from_unix(secs: u64) -> Self {
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Shift the era to start on 0000-03-01 so leap days end a year.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday (weekday 5 when Sunday is 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Whether the guest's writes to register `index` are ignored (the clock is
/// the host's; the status registers keep our mode).
fn read_only(index: usize) -> bool {
    index <= STATUS_D || index == CENTURY
}

/// What the read-only registers hold from power-on (the time registers are
/// computed on each read and hold zero).
fn power_on_value(index: usize) -> u8 {
    match index {
        STATUS_A => STATUS_A_DEFAULT,
        STATUS_B => STATUS_B_24H,
        STATUS_D => STATUS_D_VRT,
        _ => 0,
    }
}

struct Registers {
    index: u8,
    ram: [u8; CMOS_RAM_LEN],
}

/// The CMOS device.
pub struct Cmos {
    regs: Mutex<Registers>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

/// The index register and the RAM; the time is not saved (it is the host's).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// The selected register, 0..=0x7f (without the NMI-mask bit).
    pub index: u8,
    /// All [`CMOS_RAM_LEN`] bytes, the read-only registers included.
    pub ram: Vec<u8>,
}

impl Cmos {
    /// CMOS for a guest with `below_4g` bytes of RAM under 4 GiB and
    /// `above_4g` above it, with the clock reading the host's wall clock.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        Self::with_clock(below_4g, above_4g, || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
    }

    /// As [`Cmos::new`] with a clock of the caller's (seconds since the epoch).
    pub fn with_clock(
        below_4g: u64,
        above_4g: u64,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        let mut ram = [0u8; CMOS_RAM_LEN];
        for (index, byte) in ram.iter_mut().enumerate().filter(|(i, _)| read_only(*i)) {
            *byte = power_on_value(index);
        }
        // Base memory: 640 KiB.
        ram[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        // Extended memory between 1 MiB and 64 MiB, in KiB (capped at 0xffff).
        let ext_kib = (below_4g.saturating_sub(MIB) / KIB).min(0xffff) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        // Memory between 16 MiB and 4 GiB, in 64 KiB units.
        let high_64k = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&high_64k.to_le_bytes());
        // Memory above 4 GiB, in 64 KiB units (24 bits).
        let above_64k = (above_4g / (64 * KIB)).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&above_64k.to_le_bytes()[..3]);
        Self {
            regs: Mutex::new(Registers { index: 0, ram }),
            clock: Box::new(clock),
        }
    }

    /// The index and RAM, for migration.
    pub fn state(&self) -> CmosState {
        let regs = self.regs.lock().expect("cmos lock poisoned");
        CmosState {
            index: regs.index,
            ram: regs.ram.to_vec(),
        }
    }

    /// Takes on `state` (from [`Cmos::state`] on the source). The memory-size
    /// bytes come from the source too: the guest may have rewritten them,
    /// and the target was built for the same RAM. On error the device is
    /// unchanged.
    pub fn restore(&self, state: &CmosState) -> Result<(), DeviceStateError> {
        if state.index > INDEX_MASK {
            return Err(DeviceStateError::InvalidValue {
                device: "cmos",
                field: "index",
                value: u64::from(state.index),
                expected: "at most 0x7f (bit 7 is the NMI mask, not kept)",
            });
        }
        let ram: [u8; CMOS_RAM_LEN] =
            state
                .ram
                .as_slice()
                .try_into()
                .map_err(|_| DeviceStateError::WrongLength {
                    device: "cmos",
                    field: "ram",
                    len: state.ram.len(),
                    expected: CMOS_RAM_LEN,
                })?;
        // The guest cannot change these, so another value is not a state
        // this device reached (a status register in another mode, say,
        // would tell the guest the BCD time is binary).
        if let Some((index, &value)) = ram
            .iter()
            .enumerate()
            .find(|(i, v)| read_only(*i) && **v != power_on_value(*i))
        {
            return Err(DeviceStateError::InvalidValue {
                device: "cmos",
                field: read_only_field(index),
                value: u64::from(value),
                expected: "read-only, so it must hold its power-on value",
            });
        }
        let mut regs = self.regs.lock().expect("cmos lock poisoned");
        *regs = Registers {
            index: state.index,
            ram,
        };
        Ok(())
    }

    fn read_register(&self, regs: &Registers) -> u8 {
        let index = usize::from(regs.index);
        let time = || DateTime::from_unix((self.clock)());
        match index {
            SECONDS => bcd(time().second),
            MINUTES => bcd(time().minute),
            HOURS => bcd(time().hour),
            WEEKDAY => bcd(time().weekday),
            DAY => bcd(time().day),
            MONTH => bcd(time().month),
            YEAR => bcd(time().year % 100),
            CENTURY => bcd(time().year / 100),
            // Reading status C clears the pending-interrupt flags; none here.
            STATUS_C => 0,
            _ => regs.ram[index],
        }
    }
}

/// A read-only register's name, for errors.
fn read_only_field(index: usize) -> &'static str {
    match index {
        SECONDS => "ram[0x00] (seconds)",
        0x01 => "ram[0x01] (seconds alarm)",
        MINUTES => "ram[0x02] (minutes)",
        0x03 => "ram[0x03] (minutes alarm)",
        HOURS => "ram[0x04] (hours)",
        0x05 => "ram[0x05] (hours alarm)",
        WEEKDAY => "ram[0x06] (weekday)",
        DAY => "ram[0x07] (day)",
        MONTH => "ram[0x08] (month)",
        YEAR => "ram[0x09] (year)",
        STATUS_A => "ram[0x0a] (status A)",
        STATUS_B => "ram[0x0b] (status B)",
        STATUS_C => "ram[0x0c] (status C)",
        STATUS_D => "ram[0x0d] (status D)",
        CENTURY => "ram[0x32] (century)",
        _ => "ram",
    }
}

impl BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().expect("cmos lock poisoned");
        let value = match offset {
            0 => regs.index,
            _ => self.read_register(&regs),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let mut regs = self.regs.lock().expect("cmos lock poisoned");
        match offset {
            // Bit 7 of the index is the NMI mask, not part of the index.
            0 => regs.index = value & INDEX_MASK,
            _ => {
                let index = usize::from(regs.index);
                if !read_only(index) {
                    regs.ram[index] = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(cmos: &Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    #[test]
    fn civil_dates() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(
            DateTime::from_unix(951_827_696),
            DateTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 12,
                minute: 34,
                second: 56,
                weekday: 3
            }
        );
        // 2026-11-22 00:00:00 UTC, a Sunday.
        let d = DateTime::from_unix(1_795_305_600);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2026, 11, 22, 1));
    }

    #[test]
    fn time_registers_are_bcd_from_the_clock() {
        let cmos = Cmos::with_clock(0, 0, || 951_827_696);
        assert_eq!(read(&cmos, 0x00), 0x56);
        assert_eq!(read(&cmos, 0x02), 0x34);
        assert_eq!(read(&cmos, 0x04), 0x12);
        assert_eq!(read(&cmos, 0x07), 0x29);
        assert_eq!(read(&cmos, 0x08), 0x02);
        assert_eq!(read(&cmos, 0x09), 0x00);
        assert_eq!(read(&cmos, 0x32), 0x20);
        assert_eq!(read(&cmos, 0x0b), STATUS_B_24H);
        // The NMI-mask bit does not change the index.
        assert_eq!(read(&cmos, 0x80 | 0x04), 0x12);
    }

    #[test]
    fn memory_size_bytes() {
        let cmos = Cmos::with_clock(3 * 1024 * MIB, 2 * 1024 * MIB, || 0);
        let word = |lo| u16::from(read(&cmos, lo)) | u16::from(read(&cmos, lo + 1)) << 8;
        assert_eq!(word(0x15), 640);
        assert_eq!(word(0x17), 0xffff);
        assert_eq!(word(0x34), ((3 * 1024 - 16) * 16) as u16);
        let above = u32::from(read(&cmos, 0x5b))
            | u32::from(read(&cmos, 0x5c)) << 8
            | u32::from(read(&cmos, 0x5d)) << 16;
        assert_eq!(above, 2 * 1024 * 16);
        // Small guests.
        let small = Cmos::with_clock(32 * MIB, 0, || 0);
        assert_eq!(
            u16::from(read(&small, 0x17)) | u16::from(read(&small, 0x18)) << 8,
            31 * 1024
        );
        assert_eq!(
            u16::from(read(&small, 0x34)) | u16::from(read(&small, 0x35)) << 8,
            256
        );
    }

    /// Drives `cmos` through its ports: NVRAM bytes and a rewritten
    /// memory-size byte, leaving the index on one of them.
    fn drive(cmos: &Cmos) {
        for (index, value) in [(0x40u8, 0xab), (0x7f, 0x01), (0x15, 0x7f), (0x0e, 0x33)] {
            cmos.write(0, &[0x80 | index]);
            cmos.write(1, &[value]);
        }
        cmos.write(0, &[0x80 | 0x40]);
    }

    /// What the guest sees: the data port at the current index first (so
    /// the index counts), then every register.
    fn observe(cmos: &Cmos) -> Vec<u8> {
        let mut data = [0u8];
        cmos.read(1, &mut data);
        let mut index = [0u8];
        cmos.read(0, &mut index);
        let mut seen = vec![data[0], index[0]];
        seen.extend((0..0x80).map(|i| read(cmos, i)));
        seen
    }

    #[test]
    fn restored_cmos_behaves_like_the_source() {
        let src = Cmos::with_clock(3 * 1024 * MIB, MIB * 1024, || 951_827_696);
        drive(&src);
        let state = src.state();
        assert_eq!(state.index, 0x40);
        assert_eq!((state.ram[0x40], state.ram[0x15]), (0xab, 0x7f));
        // A target built for another RAM size takes the source's bytes.
        let dst = Cmos::with_clock(0, 0, || 951_827_696);
        dst.restore(&state).unwrap();
        assert_eq!(dst.state(), state);
        let seen = observe(&src);
        assert_eq!(observe(&dst), seen);
        assert_eq!(&seen[..2], &[0xab, 0x40]);
        assert_eq!(seen[2 + 0x7f], 0x01);
    }

    #[test]
    fn the_restored_clock_is_the_targets() {
        let src = Cmos::with_clock(0, 0, || 951_827_696);
        let dst = Cmos::with_clock(0, 0, || 951_827_696 + 61);
        dst.restore(&src.state()).unwrap();
        assert_eq!((read(&src, 0x00), read(&src, 0x02)), (0x56, 0x34));
        assert_eq!((read(&dst, 0x00), read(&dst, 0x02)), (0x57, 0x35));
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let cmos = Cmos::with_clock(0, 0, || 0);
        drive(&cmos);
        let before = cmos.state();
        let refused = |bad: CmosState, field: &str| {
            let err = cmos.restore(&bad).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
            assert!(err.to_string().contains("cmos"), "{err}");
            assert_eq!(cmos.state(), before);
        };
        refused(
            CmosState {
                index: 0x80,
                ..before.clone()
            },
            "index",
        );
        for len in [0, 127, 129, 4096] {
            refused(
                CmosState {
                    ram: vec![0; len],
                    ..before.clone()
                },
                "ram",
            );
        }
        for (index, name) in [(0x0b, "status B"), (0x00, "seconds"), (0x32, "century")] {
            let mut bad = before.clone();
            bad.ram[index] ^= 0x04;
            refused(bad, name);
        }
        assert!(matches!(
            cmos.restore(&CmosState {
                ram: vec![0; 127],
                ..before.clone()
            }),
            Err(DeviceStateError::WrongLength {
                len: 127,
                expected: 128,
                ..
            })
        ));
    }

    #[test]
    fn clock_and_status_registers_ignore_writes() {
        let cmos = Cmos::with_clock(0, 0, || 0);
        cmos.write(0, &[0x0b]);
        cmos.write(1, &[0x06]);
        assert_eq!(read(&cmos, 0x0b), STATUS_B_24H);
        cmos.write(0, &[0x40]);
        cmos.write(1, &[0xab]);
        assert_eq!(read(&cmos, 0x40), 0xab);
    }
}
