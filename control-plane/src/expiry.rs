//! Per-project expiry strings in `mcp_token.enabled_projects`: RFC 3339, or
//! a naive ISO-8601 date/time treated as UTC (what InfraBox's
//! `datetime.fromisoformat` accepts and InfraBox stores), and the naive-UTC
//! timestamp text InfraBox returns (`datetime.isoformat()`).

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};

/// Parses an expiry into unix seconds; `None` for anything malformed
/// (the caller then denies the project).
pub fn parse_expiry(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp());
    }
    // fromisoformat also accepts an offset with a space or other separator.
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M%:z", "%Y-%m-%d %H:%M%:z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.timestamp());
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt.and_utc().timestamp());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(d.and_time(NaiveTime::MIN).and_utc().timestamp());
    }
    None
}

/// Formats a naive UTC timestamp like Python's `datetime.isoformat()`:
/// microseconds only when non-zero, no offset.
pub fn isoformat(dt: NaiveDateTime) -> String {
    use chrono::Timelike;
    if dt.nanosecond() / 1000 == 0 {
        dt.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        dt.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339_and_naive_iso_as_utc() {
        let want = 1_796_083_200; // 2026-12-01T00:00:00Z
        for s in [
            "2026-12-01T00:00:00Z",
            "2026-12-01T00:00:00+00:00",
            "2026-12-01T01:00:00+01:00",
            "2026-12-01T00:00:00",
            "2026-12-01 00:00:00",
            "2026-12-01T00:00:00.000000",
            "2026-12-01T00:00",
            "2026-12-01",
            " 2026-12-01T00:00:00z ",
        ] {
            assert_eq!(parse_expiry(s), Some(want), "{s}");
        }
    }

    #[test]
    fn malformed_is_none() {
        for s in ["", "soon", "2026-13-01", "2026-12-01T25:00:00", "1796083200", "2026-12-01T00:00:00+99:00"] {
            assert_eq!(parse_expiry(s), None, "{s}");
        }
    }

    #[test]
    fn isoformat_matches_python() {
        let dt = NaiveDateTime::parse_from_str("2026-12-01T00:00:00", "%Y-%m-%dT%H:%M:%S").unwrap();
        assert_eq!(isoformat(dt), "2026-12-01T00:00:00");
        let dt = NaiveDateTime::parse_from_str("2026-12-01T00:00:00.5", "%Y-%m-%dT%H:%M:%S%.f").unwrap();
        assert_eq!(isoformat(dt), "2026-12-01T00:00:00.500000");
    }
}
