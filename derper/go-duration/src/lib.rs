//! Go's `time.ParseDuration`, so that a duration flag means the same in our derper and operator
//! as in Tailscale's Go derper (`10m`, `1h30m`, `500ms`, `1.5h`, `0`), and a value Go refuses is
//! refused here too (a bare number other than 0, an unknown unit, more than about 290 years).
//! Never panics on what a user typed.

use std::time::Duration;

/// What is wrong with a duration string, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("empty duration (e.g. 10s, 5m, 1h30m)")]
    Empty,
    #[error("invalid duration {0:?}: missing unit (e.g. 10s, 5m)")]
    MissingUnit(String),
    #[error("invalid duration {0:?}: not a number")]
    Number(String),
    #[error("invalid duration {input:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h)")]
    Unit { input: String, unit: String },
    #[error("invalid duration {0:?}: negative")]
    Negative(String),
    #[error("invalid duration {0:?}: out of range (Go's limit is about 290 years)")]
    OutOfRange(String),
}

/// Go's limit: an `int64` of nanoseconds.
const MAX_SECS: u64 = i64::MAX as u64 / 1_000_000_000;

/// Parses `s` as Go's `time.ParseDuration` does, except that a negative duration (which no
/// timeout or interval can use) is an error.
pub fn parse(s: &str) -> Result<Duration, Error> {
    let input = || s.to_string();
    let body = match s.strip_prefix('+') {
        Some(rest) => rest,
        None if s.starts_with('-') => return Err(Error::Negative(input())),
        None => s,
    };
    if body.is_empty() {
        return Err(Error::Empty);
    }
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = body;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| Error::MissingUnit(input()))?;
        let (num, tail) = rest.split_at(num_end);
        // Go accepts "1.", ".5" but not "." alone; Rust's f64 parser agrees on all three.
        let value: f64 = num.parse().map_err(|_| Error::Number(input()))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(Error::MissingUnit(input())),
            _ => {
                return Err(Error::Unit {
                    input: input(),
                    unit: unit.to_string(),
                });
            }
        };
        total += value * seconds_per_unit;
        rest = tail;
    }
    Duration::try_from_secs_f64(total)
        .ok()
        .filter(|d| d.as_secs() <= MAX_SECS)
        .ok_or_else(|| Error::OutOfRange(input()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_people_write() {
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("+2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn what_go_refuses_is_refused_with_the_reason() {
        assert_eq!(parse(""), Err(Error::Empty));
        assert_eq!(parse("10"), Err(Error::MissingUnit("10".into())));
        assert!(matches!(parse("5x"), Err(Error::Unit { .. })));
        assert!(matches!(parse("5 minutes"), Err(Error::Unit { .. })));
        assert_eq!(parse("."), Err(Error::MissingUnit(".".into())));
        assert_eq!(parse(".s"), Err(Error::Number(".s".into())));
        assert_eq!(parse("-5s"), Err(Error::Negative("-5s".into())));
    }

    #[test]
    fn out_of_range_is_an_error_not_a_panic() {
        assert!(matches!(
            parse("99999999999999999999h"),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(parse("300y"), Err(Error::Unit { .. })));
        assert!(parse("2562047h").is_ok());
        assert!(matches!(parse("2562048h"), Err(Error::OutOfRange(_))));
    }
}
