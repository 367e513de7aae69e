//! Sizes and durations as operators write them: `"1GiB"`, `"1TB"`, `"30s"`, `"1h 30m"`.

use super::*;

/// A byte size: an integer or a string such as "512MiB", "1GiB", "4k", "1TB" (see [`parse_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size in bytes or a string such as \"512MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).ok_or_else(|| {
                    E::custom(format!(
                        "`{s}` is not a size: use KiB/MiB/GiB/TiB (or K/M/G/T) for powers of 1024, kB/MB/GB/TB for powers of 1000, e.g. \"512MiB\""
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a byte size as `dd` and the SI/IEC standards read it: "4096" or "4096B" bytes;
/// "KiB", "MiB", "GiB", "TiB", "PiB" and the bare "K", "M", "G", "T", "P" are powers of 1024;
/// "kB"/"KB", "MB", "GB", "TB", "PB" are powers of 1000 (so "1TB" is 10^12 bytes, "1TiB" 2^40).
/// Units are case-insensitive except that "m"/"mb" never mean milli. A fraction is allowed when
/// it comes to whole bytes ("1.5GiB"). `None`: not a size, or more than 2^64 - 1 bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.len() > 18 || (num.contains('.') && frac.is_empty()) {
        return None;
    }
    let unit = unit.trim().to_ascii_lowercase();
    let (base, power): (u128, u32) = match unit.as_str() {
        "" | "b" => (1, 0),
        "k" | "kib" => (1024, 1),
        "m" | "mib" => (1024, 2),
        "g" | "gib" => (1024, 3),
        "t" | "tib" => (1024, 4),
        "p" | "pib" => (1024, 5),
        "kb" => (1000, 1),
        "mb" => (1000, 2),
        "gb" => (1000, 3),
        "tb" => (1000, 4),
        "pb" => (1000, 5),
        _ => return None,
    };
    let mult = base.pow(power);
    let scale = 10u128.pow(frac.len() as u32);
    let int: u128 = int.parse().ok()?;
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let scaled = int.checked_mul(scale)?.checked_add(frac)?.checked_mul(mult)?;
    if scaled % scale != 0 {
        return None; // not a whole number of bytes
    }
    u64::try_from(scaled / scale).ok()
}

/// Parses a duration as humantime writes them: one or more `<number><unit>` terms, optionally
/// separated by spaces ("30s", "1m 30s", "1h30m", "250ms"), units ns, us/µs, ms, s/sec/secs/
/// second/seconds, m/min/mins/minute/minutes, h/hr/hrs/hour/hours, d/day/days; a bare "0" is
/// zero. `None`: not a duration.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c.is_whitespace()).unwrap_or(rest.len());
        let term = match &rest[..unit_len] {
            "ns" | "nsec" => Duration::from_nanos(n),
            "us" | "µs" | "usec" => Duration::from_micros(n),
            "ms" | "msec" => Duration::from_millis(n),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(n.checked_mul(60)?),
            "h" | "hr" | "hrs" | "hour" | "hours" => Duration::from_secs(n.checked_mul(3600)?),
            "d" | "day" | "days" => Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
        total = total.checked_add(term)?;
        rest = rest[unit_len..].trim_start();
    }
    Some(total)
}

/// Parses "75us", "1ms", "2s" into microseconds.
pub fn parse_micros(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    match &s[split..] {
        "us" => Some(n),
        "ms" => n.checked_mul(1000),
        "s" => n.checked_mul(1_000_000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m 15s"), Some(Duration::from_secs(5415)));
        assert_eq!(parse_duration("2 days"), None, "the unit follows the number");
        assert_eq!(parse_duration("2days"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("75us"), Some(Duration::from_micros(75)));
        assert_eq!(parse_duration("10"), None, "a unit is needed");
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("1.5s"), None);
    }
}
