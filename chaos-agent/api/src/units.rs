//! Units in requests: durations (`250ms`, `2s`, `1m`), rates (tc's `1mbit`, `512kbit`, `1mbps`) and signals.

use std::time::Duration;

/// Parses a duration: a number of seconds, or a number with `ms`, `s`, `m`, `h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num.trim().parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" | "sec" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Parses a rate given as text with tc's units into bytes per second (`bit`, `kbit`, `mbit`, `gbit` are bits/s;
/// `bps`, `kbps`, `mbps`, `gbps` and a bare number are bytes/s). `None` below 1 byte/s or for unknown units.
pub fn parse_rate(text: &str) -> Option<u64> {
    let s = text.trim().to_ascii_lowercase();
    let i = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..i].trim().parse().ok()?;
    let bytes = match s[i..].trim() {
        "" | "bps" => n,
        "kbps" => n * 1e3,
        "mbps" => n * 1e6,
        "gbps" => n * 1e9,
        "bit" => n / 8.0,
        "kbit" => n * 1e3 / 8.0,
        "mbit" => n * 1e6 / 8.0,
        "gbit" => n * 1e9 / 8.0,
        _ => return None,
    };
    rate_from_bytes(bytes)
}

/// A number of bytes per second as a rate (`None` below 1).
pub(crate) fn rate_from_bytes(bytes: f64) -> Option<u64> {
    (bytes >= 1.0).then_some(bytes as u64)
}

/// Signal names accepted in requests (`SIGTERM`, `term`, `15`); numbers 1–64.
pub fn parse_signal(name: &str) -> Option<i32> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Ok(n) = bare.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    Some(match bare {
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "ABRT" => libc::SIGABRT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "SEGV" => libc::SIGSEGV,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("x"), None);
    }

    #[test]
    fn rates_in_tc_units() {
        assert_eq!(parse_rate("1mbit"), Some(125_000));
        assert_eq!(parse_rate("2mbps"), Some(2_000_000));
        assert_eq!(parse_rate("5000"), Some(5000));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_rate("0"), None);
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGKILL"), Some(9));
        assert_eq!(parse_signal("term"), Some(15));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGBOGUS"), None);
        assert_eq!(parse_signal("99"), None);
    }
}
