//! One line per event on stderr: `<UTC timestamp> <LEVEL> <service>[<pid>]: <message>`.
//!
//! Service managers (systemd's journal, SMF's log files) capture stderr, so the services need no
//! log files of their own. Newlines inside a message are escaped so that every event stays on one
//! line and log readers never see half an event.

use std::fmt;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static SERVICE: OnceLock<&'static str> = OnceLock::new();

/// The severity of a log line.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// Sets the service name that prefixes every line; later calls are ignored.
pub fn init(service: &'static str) {
    let _ = SERVICE.set(service);
}

/// Writes one event; use the `info!`, `warn!` and `error!` macros instead.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let line = format_line(SystemTime::now(), level, args);
    // A failed write to stderr has nowhere better to be reported, so it is ignored.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs an event at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Logs an event at warning level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($arg)*)) };
}

/// Logs an event at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}

fn format_line(now: SystemTime, level: Level, args: fmt::Arguments<'_>) -> String {
    let service = SERVICE.get().copied().unwrap_or("service");
    let message = args.to_string().replace('\r', "\\r").replace('\n', "\\n");
    format!(
        "{} {} {}[{}]: {}\n",
        timestamp(now),
        level.as_str(),
        service,
        std::process::id(),
        message
    )
}

/// Formats a time as RFC 3339 in UTC with milliseconds, such as `2024-03-01T12:00:00.250Z`.
pub fn timestamp(now: SystemTime) -> String {
    // A clock before 1970 is a broken clock; printing the epoch is more useful than failing.
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm),
/// which spares the services a date-time dependency for one line of formatting.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T23:59:58.250Z, a leap day, checks the month and year arithmetic.
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_198_250);
        assert_eq!(timestamp(t), "2024-02-29T23:59:58.250Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn every_event_is_one_line() {
        let line = format_line(UNIX_EPOCH, Level::Error, format_args!("bad\nthing\r\nhere"));
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.ends_with(": bad\\nthing\\r\\nhere\n"), "{line:?}");
        assert!(line.starts_with("1970-01-01T00:00:00.000Z ERROR "), "{line:?}");
    }
}
