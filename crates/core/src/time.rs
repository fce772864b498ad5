//! UTC calendar dates from Unix times, for the timestamps vconvert prints (snapshot
//! dates in `info`, the import service's records) without a date crate.

/// A Unix time (seconds since 1970-01-01 00:00:00 UTC) as `(year, month, day, hour,
/// minute, second)` in UTC, by Howard Hinnant's `civil_from_days`.
pub fn utc_fields(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(utc_fields(0), (1970, 1, 1, 0, 0, 0));
        // 2000-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc_fields(951_827_696), (2000, 2, 29, 12, 34, 56));
        // 2026-11-25 16:05:08 UTC.
        assert_eq!(utc_fields(1_795_622_708), (2026, 11, 25, 16, 5, 8));
    }
}
