//! Values as people type and read them: durations on command lines, byte counts in output.

/// Parses a duration as the command lines of all three programs take it, in `humantime`'s
/// grammar (`500ms`, `30s`, `2m`, `1h 30m`, `2days`); a bare number counts as seconds (`30`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("invalid duration {s:?}: {e} (expected a number and a unit, like 30s or 500ms)")
    })
}

/// Byte counts as output shows them: `10 B`, `1.50 KiB`, `3.00 GiB`.
pub use indicatif::HumanBytes;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1s 500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86400)));
        assert!(parse_duration("2 fortnights").is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(HumanBytes(10).to_string(), "10 B");
        assert_eq!(HumanBytes(1536).to_string(), "1.50 KiB");
        assert_eq!(HumanBytes(3 << 30).to_string(), "3.00 GiB");
    }
}
