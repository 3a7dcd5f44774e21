//! Host memory: what is available, sizes as the command line spells them, and refusing a
//! run before it allocates more than there is.

use crate::error::{Error, Result};

/// Where the available figure comes from on Linux.
pub const MEMINFO: &str = "/proc/meminfo";

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Host memory available to a new allocation now (`MemAvailable`), where the system
/// says; `None` elsewhere.
pub fn available_host_bytes() -> Option<u64> {
    std::fs::read_to_string(MEMINFO)
        .ok()
        .and_then(|t| parse_meminfo(&t))
}

/// Parses a size: bytes, or a number with a binary suffix `K`, `M`, `G`, `T` (optionally
/// followed by `i`/`iB`/`B`), e.g. `512M`, `24GiB`, `1.5G`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let bad = || format!("`{s}`: expected bytes or a size such as 512M, 24G, 1.5T");
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        _ => return Err(bad()),
    };
    let value: f64 = num.parse().map_err(|_| bad())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}`: must be at least 1 byte and below 16 EiB"));
    }
    Ok(bytes as u64)
}

/// The host memory a run may take: the explicit cap when given, else what is
/// available now; with where the figure comes from. `None` when neither is known.
pub fn host_budget(cap: Option<u64>) -> Option<(u64, String)> {
    match cap {
        Some(c) => Some((c, "--max-host-memory".to_string())),
        None => available_host_bytes().map(|a| (a, format!("MemAvailable in {MEMINFO}"))),
    }
}

/// Refuses `need` bytes for `what` when they exceed the budget of [`host_budget`]
/// (nothing is refused when no budget is known).
pub fn check_host(what: &str, need: u64, cap: Option<u64>) -> Result<()> {
    match host_budget(cap) {
        Some((available, limit)) if need > available => Err(Error::HostMemory {
            what: what.to_string(),
            need,
            available,
            hint: if cap.is_some() {
                "raise --max-host-memory if the machine has it, or shrink the run".to_string()
            } else {
                "shrink the run (fewer tokens, layers or ranks, a smaller shape); \
                 --max-host-memory overrides the figure"
                    .to_string()
            },
            limit,
        }),
        _ => Ok(()),
    }
}

/// Bytes in mebibytes, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(22_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: 99999999999999999 kB\n"), None);
    }

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in ["", "x", "12Q", "-1G", "0", "1e400", "99999999999T", "NaN"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_need_over_the_cap_is_a_typed_error_naming_both() {
        check_host("small", 1000, Some(1000)).unwrap();
        match check_host("the layer", 2000, Some(1000)) {
            Err(e @ Error::HostMemory { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("the layer needs 2000 bytes"), "{msg}");
                assert!(msg.contains("--max-host-memory allows 1000"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
}
