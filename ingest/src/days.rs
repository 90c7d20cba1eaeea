//! Calendar dates as day numbers (days since 1970-01-01), by the `time` crate.
//! Callers decide which day a timestamp falls in (UTC for digests, UTC+8 for
//! rollups); this module only names days.

use time::{Date, Month};

/// Julian day number of 1970-01-01.
const EPOCH_JULIAN_DAY: i64 = 2_440_588;

/// `YYYY-MM-DD` of day number `day`.
pub fn format(day: i64) -> String {
    match i32::try_from(day + EPOCH_JULIAN_DAY)
        .ok()
        .and_then(|j| Date::from_julian_day(j).ok())
    {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => format!("day {day}"),
    }
}

/// Why `parse` refused a text.
#[derive(Debug, PartialEq, Eq)]
pub enum DateError {
    /// Not of the form `YYYY-MM-DD`.
    Format,
    /// Well formed, but no such date (`2023-02-29`).
    NoSuchDate,
}

/// The day number of a strict `YYYY-MM-DD` date.
pub fn parse(text: &str) -> Result<i64, DateError> {
    let b = text.as_bytes();
    if b.len() != 10
        || b[4] != b'-'
        || b[7] != b'-'
        || !text
            .bytes()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    {
        return Err(DateError::Format);
    }
    let number = |r: std::ops::Range<usize>| text[r].parse::<u16>().map_err(|_| DateError::Format);
    let (y, m, d) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let month = u8::try_from(m)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or(DateError::NoSuchDate)?;
    let date = Date::from_calendar_date(i32::from(y), month, u8::try_from(d).unwrap_or(0))
        .map_err(|_| DateError::NoSuchDate)?;
    Ok(i64::from(date.to_julian_day()) - EPOCH_JULIAN_DAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip_across_leap_years_and_the_epoch() {
        assert_eq!(format(0), "1970-01-01");
        assert_eq!(format(-1), "1969-12-31");
        assert_eq!(parse("2024-02-29"), Ok(19_782));
        assert_eq!(parse("2023-02-29"), Err(DateError::NoSuchDate));
        assert_eq!(parse("2026-13-01"), Err(DateError::NoSuchDate));
        assert_eq!(parse("2026-1-01"), Err(DateError::Format));
        assert_eq!(parse("25.11.2026"), Err(DateError::Format));
        assert_eq!(parse("+026-11-25"), Err(DateError::Format));
        // Years 0000 to 9999, the ones `YYYY` can name.
        for day in (-719_528..2_932_897).step_by(997) {
            assert_eq!(parse(&format(day)), Ok(day));
        }
    }
}
