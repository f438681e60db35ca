//! Times: the time column's text as milliseconds since the Unix epoch (UTC).

use chrono::format::{Item, Parsed, StrftimeItems};
use shoal_spec::SpecError;

use super::columns::MS_PER_DAY;

// ---------------------------------------------------------------------------
// Time parsing

/// Parses the time column's text: ISO-8601 / RFC 3339 by default, or a strftime
/// format (`input.time_format`). Naive times are UTC; a date alone is midnight UTC.
pub struct TimeParser {
    format: Option<(String, Vec<Item<'static>>)>,
}

impl TimeParser {
    pub fn new(time_format: Option<&str>) -> Result<TimeParser, SpecError> {
        let format = match time_format {
            None => None,
            Some(f) => {
                let items =
                    StrftimeItems::new(f)
                        .parse_to_owned()
                        .map_err(|e| SpecError::Invalid {
                            field: "input.time_format",
                            message: format!("`{f}` is not a valid strftime format: {e}"),
                        })?;
                Some((f.to_string(), items))
            }
        };
        Ok(TimeParser { format })
    }

    /// Milliseconds since the Unix epoch, or `None` when `s` is not a time.
    pub fn parse(&self, s: &str) -> Option<i64> {
        match &self.format {
            None => parse_iso_ms(s),
            Some((_, items)) => parse_with_items(items, s.trim()),
        }
    }

    pub(crate) fn expected(&self) -> String {
        match &self.format {
            None => "YYYY-MM-DD, YYYY-MM-DD HH:MM[:SS[.fff]] or RFC 3339".to_string(),
            Some((f, _)) => format!("input.time_format `{f}`"),
        }
    }
}

fn parse_with_items(items: &[Item<'static>], s: &str) -> Option<i64> {
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, s, items.iter()).ok()?;
    if parsed.offset().is_some() {
        return parsed.to_datetime().ok().map(|t| t.timestamp_millis());
    }
    match parsed.to_naive_datetime_with_offset(0) {
        Ok(t) => Some(t.and_utc().timestamp_millis()),
        // A format without a time of day: the date at midnight.
        Err(_) => parsed.to_naive_date().ok().map(|d| {
            d.and_time(chrono::NaiveTime::MIN)
                .and_utc()
                .timestamp_millis()
        }),
    }
}

#[inline]
fn digits2(b: &[u8], at: usize) -> Option<u32> {
    match b.get(at..at + 2)? {
        [x @ b'0'..=b'9', y @ b'0'..=b'9'] => Some(u32::from(x - b'0') * 10 + u32::from(y - b'0')),
        _ => None,
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The default time format, without allocation: `YYYY-MM-DD`, then optionally
/// ` ` or `T` and `HH:MM[:SS[.fraction]]`, then optionally `Z` or `±HH:MM`
/// (`±HHMM`, `±HH` too). Surrounding spaces are ignored.
pub fn parse_iso_ms(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let year = {
        let y = b.get(0..4)?;
        if !y.iter().all(u8::is_ascii_digit) {
            return None;
        }
        y.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'))
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let month = digits2(b, 5)?;
    let day = digits2(b, 8)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * MS_PER_DAY;
    let mut i = 10;
    if i == b.len() {
        return Some(ms);
    }
    if !matches!(b[i], b' ' | b'T' | b't') {
        return None;
    }
    let hour = digits2(b, i + 1)?;
    if b.get(i + 3) != Some(&b':') {
        return None;
    }
    let minute = digits2(b, i + 4)?;
    i += 6;
    let mut second = 0;
    let mut millis = 0;
    if b.get(i) == Some(&b':') {
        second = digits2(b, i + 1)?;
        i += 3;
        if matches!(b.get(i), Some(b'.' | b',')) {
            i += 1;
            let start = i;
            let mut scale = 100;
            while let Some(d @ b'0'..=b'9') = b.get(i) {
                millis += u32::from(d - b'0') * scale;
                scale /= 10;
                i += 1;
            }
            if i == start {
                return None;
            }
        }
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    ms += i64::from(hour) * 3_600_000
        + i64::from(minute) * 60_000
        + i64::from(second) * 1000
        + i64::from(millis);
    match b.get(i) {
        None => {}
        Some(b'Z' | b'z') => i += 1,
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits2(b, i + 1)?;
            i += 3;
            let om = match b.get(i) {
                None => 0,
                Some(b':') => {
                    let m = digits2(b, i + 1)?;
                    i += 3;
                    m
                }
                Some(_) => {
                    let m = digits2(b, i)?;
                    i += 2;
                    m
                }
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = i64::from(oh) * 3_600_000 + i64::from(om) * 60_000;
            ms -= if sign == b'+' { offset } else { -offset };
        }
        Some(_) => return None,
    }
    (i == b.len()).then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn iso_times_in_every_default_form() {
        let t = |s: &str| parse_iso_ms(s);
        let base = utc(2010, 12, 1, 8, 26, 0);
        assert_eq!(t("2010-12-01"), Some(utc(2010, 12, 1, 0, 0, 0)));
        assert_eq!(t("2010-12-01 08:26"), Some(base));
        assert_eq!(t("2010-12-01 08:26:00"), Some(base));
        assert_eq!(t("2010-12-01T08:26:00"), Some(base));
        assert_eq!(t("2010-12-01t08:26:00"), Some(base));
        assert_eq!(t("  2010-12-01 08:26:00 \t"), Some(base));
        assert_eq!(t("2010-12-01 08:26:07.5"), Some(base + 7_500));
        assert_eq!(t("2010-12-01 08:26:07.123456789"), Some(base + 7_123));
        assert_eq!(t("2010-12-01T08:26:00Z"), Some(base));
        assert_eq!(t("2010-12-01T08:26:00.250z"), Some(base + 250));
        assert_eq!(t("2010-12-01T08:26:00+01:00"), Some(base - 3_600_000));
        assert_eq!(
            t("2010-12-01T08:26:00-05:30"),
            Some(base + 5 * 3_600_000 + 30 * 60_000)
        );
        assert_eq!(t("2010-12-01T08:26:00+0100"), Some(base - 3_600_000));
        assert_eq!(t("2010-12-01 08:26+02"), Some(base - 7_200_000));
        assert_eq!(t("2012-02-29"), Some(utc(2012, 2, 29, 0, 0, 0)));
        assert_eq!(t("1969-12-31 23:59:59"), Some(-1000));
        assert_eq!(t("1600-03-01"), Some(utc(1600, 3, 1, 0, 0, 0)));
        for bad in [
            "",
            "yesterday",
            "2011-02-29",
            "2010-13-01",
            "2010-00-10",
            "2010-12-32",
            "2010-12-01 24:00",
            "2010-12-01 08:60",
            "2010-12-01 08:26:60",
            "2010-12-01 8:26",
            "2010-12-01 08",
            "2010-12-01 08:26:00.",
            "2010-12-01 08:26:00 junk",
            "2010-12-01T08:26:00+25:00",
            "2010-12-01T08:26:00+01:",
            "2010-12-01x",
            "12/1/2010 8:26",
            "20101201",
            "2010-1-01",
        ] {
            assert_eq!(t(bad), None, "`{bad}` must not parse");
        }
    }

    #[test]
    fn iso_fast_path_agrees_with_chrono() {
        // A brute-force twin: chrono formats, the fast path parses.
        let mut ms = utc(1890, 1, 1, 0, 0, 0);
        let end = utc(2110, 1, 1, 0, 0, 0);
        let mut n = 0;
        while ms < end {
            let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap();
            let naive = dt.naive_utc();
            assert_eq!(
                parse_iso_ms(&naive.format("%Y-%m-%d %H:%M:%S%.3f").to_string()),
                Some(ms)
            );
            assert_eq!(parse_iso_ms(&dt.to_rfc3339()), Some(ms));
            let date = naive.date();
            assert_eq!(
                parse_iso_ms(&date.format("%Y-%m-%d").to_string()),
                Some(
                    date.and_hms_opt(0, 0, 0)
                        .unwrap()
                        .and_utc()
                        .timestamp_millis()
                )
            );
            ms += 7_919_993_117; // ~92 days and an odd number of ms
            n += 1;
        }
        assert!(n > 800);
    }

    #[test]
    fn custom_time_formats() {
        let p = TimeParser::new(Some("%d/%m/%Y %H:%M")).unwrap();
        assert_eq!(
            p.parse("01/12/2010 08:26"),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );
        assert_eq!(
            p.parse(" 01/12/2010 08:26 "),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );
        assert_eq!(p.parse("2010-12-01 08:26"), None);
        assert_eq!(p.parse("garbage"), None);

        let date_only = TimeParser::new(Some("%m/%d/%Y")).unwrap();
        assert_eq!(
            date_only.parse("12/1/2010"),
            Some(utc(2010, 12, 1, 0, 0, 0))
        );
        assert_eq!(date_only.parse("13/1/2010"), None);

        let with_offset = TimeParser::new(Some("%Y-%m-%d %H:%M:%S %z")).unwrap();
        assert_eq!(
            with_offset.parse("2010-12-01 09:26:00 +0100"),
            Some(utc(2010, 12, 1, 8, 26, 0))
        );

        let default = TimeParser::new(None).unwrap();
        assert_eq!(default.parse("2010-12-01"), Some(utc(2010, 12, 1, 0, 0, 0)));

        assert!(TimeParser::new(Some("%Q")).is_err());
    }
}
