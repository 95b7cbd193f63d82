//! What the bench reads about a server process from /proc: CPU time, RSS, threads, open fds.

use anyhow::{Context, Result, bail};

/// USER_HZ: /proc reports CPU times in these ticks; it is 100 on every Linux ABI we run on.
const TICKS_PER_SEC: f64 = 100.0;

/// User + system CPU seconds the process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses; fields start after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        bail!("/proc/{pid}/stat has no ')'");
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let tick = |i: usize| -> Result<f64> {
        f.get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .map(|v| v as f64)
            .context("parsing /proc stat")
    };
    Ok((tick(11)? + tick(12)?) / TICKS_PER_SEC)
}

fn status_field(pid: u32, name: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix(name).and_then(|r| r.strip_prefix(':')) {
            let num = v.split_whitespace().next().unwrap_or("0");
            return num.parse().with_context(|| format!("parsing {name}"));
        }
    }
    bail!("no {name} in /proc/{pid}/status")
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS")
}

pub fn threads(pid: u32) -> Result<u64> {
    status_field(pid, "Threads")
}

pub fn open_fds(pid: u32) -> Result<u64> {
    let n = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count();
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).unwrap() >= 0.0);
        assert!(rss_kib(me).unwrap() > 0);
        assert!(threads(me).unwrap() >= 1);
        assert!(open_fds(me).unwrap() >= 1);
    }
}
