//! Human-readable forms of times and sizes for command output. `--json` output keeps the raw
//! numbers; these are for people.

/// Unix seconds as an RFC 3339 UTC timestamp, e.g. `2026-12-02T08:52:39Z`.
pub fn utc_timestamp(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian `(year, month, day)` (H. Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Bytes in IEC units with one decimal where it matters: `512 B`, `64 MiB`, `6.1 GiB`.
pub fn iec_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u128 << (10 * unit);
    // Tenths, rounded down so that "16.0 GiB" is never shown for 15.99 GiB.
    let tenths = u128::from(bytes) * 10 / scale;
    if tenths.is_multiple_of(10) {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// Now, in Unix milliseconds (0 before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in Unix seconds (0 before 1970).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamp_matches_known_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        // date -u -d @1796201559
        assert_eq!(utc_timestamp(1_796_201_559), "2026-12-02T08:52:39Z");
        // A leap day.
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn iec_bytes_uses_binary_units() {
        assert_eq!(iec_bytes(0), "0 B");
        assert_eq!(iec_bytes(1023), "1023 B");
        assert_eq!(iec_bytes(64 << 20), "64 MiB");
        assert_eq!(iec_bytes((129 << 20) + 4096), "129 MiB");
        assert_eq!(iec_bytes(6_550_000_000), "6.1 GiB");
        assert_eq!(iec_bytes((16 << 30) - 1), "15.9 GiB");
        assert_eq!(iec_bytes(20 << 40), "20 TiB");
    }
}
