//! CMOS RAM and the MC146818 real-time clock (index port 0x70, data 0x71).
//!
//! The clock reads the host's wall clock (UTC) at every access, in BCD and
//! 24-hour mode; the memory-size bytes are the ones firmware (SeaBIOS, OVMF)
//! reads to size RAM.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

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

struct State {
    index: u8,
    ram: [u8; 128],
}

/// The CMOS device.
pub struct Cmos {
    state: Mutex<State>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
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
        let mut ram = [0u8; 128];
        ram[STATUS_A] = STATUS_A_DEFAULT;
        ram[STATUS_B] = STATUS_B_24H;
        ram[STATUS_D] = STATUS_D_VRT;
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
            state: Mutex::new(State { index: 0, ram }),
            clock: Box::new(clock),
        }
    }

    fn read_register(&self, state: &State) -> u8 {
        let index = usize::from(state.index);
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
            _ => state.ram[index],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let state = self.state.lock().expect("cmos lock poisoned");
        let value = match offset {
            0 => state.index,
            _ => self.read_register(&state),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let mut state = self.state.lock().expect("cmos lock poisoned");
        match offset {
            // Bit 7 of the index is the NMI mask, not part of the index.
            0 => state.index = value & 0x7f,
            _ => {
                let index = usize::from(state.index);
                // The clock is the host's; the status registers keep our mode.
                if index > STATUS_D && index != CENTURY {
                    state.ram[index] = value;
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
