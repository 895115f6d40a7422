//! What the benchmarks read of a process in `/proc`: its memory lines and its CPU time.

use std::{fs, time::Duration};

use anyhow::Context as _;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux whatever the kernel's
/// `HZ`).
const USER_HZ: u64 = 100;

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, name: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(name.trim_end_matches(':')))
        .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .with_context(|| format!("bad line {line:?}"))?
        .parse()
        .with_context(|| format!("bad line {line:?}"))
}

/// The CPU time `pid` has used (utime + stime).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's closing parenthesis: field 3 (state) on; utime and stime are 14, 15.
    let rest = stat.rsplit_once(')').context("bad /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<_, _>>()?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let rss = status_kib(me, "VmRSS").unwrap();
        let hwm = status_kib(me, "VmHWM:").unwrap();
        assert!(rss > 0 && hwm >= rss, "VmRSS {rss} KiB, VmHWM {hwm} KiB");
        assert!(status_kib(me, "VmNoSuchLine").is_err());
        // Burn a little CPU so there is some to see (ticks are 10 ms).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_time(me).unwrap() > Duration::ZERO);
        assert!(cpu_time(u32::MAX).is_err());
    }
}
