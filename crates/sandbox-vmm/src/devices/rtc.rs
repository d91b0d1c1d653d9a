//! A minimal MC146818 CMOS RTC on ports 0x70 (index) and 0x71 (data).
//!
//! Linux reads the wall clock from it at boot and, before each read, polls status register A
//! until the update-in-progress bit (UIP, bit 7) is clear. An unanswered port reads 0xff (UIP set)
//! and costs ~10,000 polls, i.e. 40,000 port exits (docs/bench.md). We report: UIP always clear,
//! 24-hour BCD mode, valid time, and the host's UTC time. Other CMOS bytes are plain RAM.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: UIP clear, 32.768 kHz time base, 1024 Hz rate.
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode (bit 1), BCD (bit 2 clear), no interrupts.
const STATUS_B: u8 = 0x02;
/// Status D: valid RAM and time (bit 7).
const STATUS_D: u8 = 0x80;

/// A source of "now" in seconds since the Unix epoch (UTC); replaced in tests.
pub type Clock = Box<dyn Fn() -> u64 + Send>;

/// The CMOS RTC: a 128-byte register file with the clock registers computed on read.
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }))
    }
}

impl Rtc {
    /// Number of ports the device spans (0x70, 0x71).
    pub const PORTS: u64 = 2;

    /// An RTC reading its time from `clock`.
    pub fn new(clock: Clock) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            clock,
        }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let now = (self.clock)();
        let (year, month, day) = civil_from_days(now / 86_400);
        let secs_of_day = now % 86_400;
        // Jan 1 1970 was a Thursday; the RTC counts Sunday as 1.
        let weekday = ((now / 86_400 + 4) % 7) + 1;
        match reg {
            REG_SECONDS => bcd(secs_of_day % 60),
            REG_MINUTES => bcd(secs_of_day / 60 % 60),
            REG_HOURS => bcd(secs_of_day / 3600),
            REG_WEEKDAY => bcd(weekday),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year % 100),
            REG_CENTURY => bcd(year / 100),
            REG_A => STATUS_A,
            REG_B => STATUS_B,
            REG_C => 0,
            REG_D => STATUS_D,
            _ => self.ram[usize::from(reg & 0x7f)],
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            if let Some(b) = data.first_mut() {
                *b = self.read_register(self.index);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = value & 0x7f,
            1 => match self.index {
                REG_SECONDS..=REG_D | REG_CENTURY => {} // clock and status: read-only here
                i => self.ram[usize::from(i)] = value,
            },
            _ => {}
        }
    }
}

/// Binary → packed BCD for values below 100.
fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`, restricted to dates after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut b = [0xffu8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn update_in_progress_is_never_set() {
        let mut rtc = Rtc::default();
        for _ in 0..3 {
            assert_eq!(read(&mut rtc, REG_A) & 0x80, 0);
        }
        // With the NMI-mask bit set in the index, too.
        assert_eq!(read(&mut rtc, REG_A | 0x80) & 0x80, 0);
    }

    #[test]
    fn time_is_reported_in_bcd() {
        // 2026-11-30 04:24:17 UTC, a Monday.
        let mut rtc = Rtc::new(Box::new(|| 1_796_012_657));
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x17);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x24);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x04);
        assert_eq!(read(&mut rtc, REG_DAY), 0x30);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x11);
        assert_eq!(read(&mut rtc, REG_YEAR), 0x26);
        assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
        assert_eq!(read(&mut rtc, REG_WEEKDAY), 0x02);
        assert_eq!(read(&mut rtc, REG_B), STATUS_B);
        assert_eq!(read(&mut rtc, REG_D), STATUS_D);
    }

    #[test]
    fn cmos_ram_keeps_writes_and_clock_ignores_them() {
        let mut rtc = Rtc::new(Box::new(|| 0));
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        rtc.write(0, &[REG_A]);
        rtc.write(1, &[0xff]);
        assert_eq!(read(&mut rtc, REG_A), STATUS_A);
        // Reads of the index port and wide accesses never panic.
        let mut wide = [0xffu8; 4];
        rtc.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        rtc.write(1, &[]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_787), (2026, 11, 30));
    }
}
