//! CPU time: of whole CPUs (`/proc/stat`, for the quiet-machine check) and of the benchmark's
//! own work (its cgroup's `cpu.stat` plus the CPUs' `ksoftirqd` threads), which other processes
//! sharing the CPUs do not inflate.

use anyhow::{Context as _, bail};

/// Jiffies of some CPUs: all of them, and the idle ones (`idle` + `iowait`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticks {
    /// Every field of the `cpuN` lines summed (user .. steal).
    pub total: u64,
    /// `idle` + `iowait`.
    pub idle: u64,
}

impl Ticks {
    /// Busy jiffies between `self` (earlier) and `later`.
    #[must_use]
    pub fn busy_since(self, later: Self) -> u64 {
        (later.total - later.idle).saturating_sub(self.total - self.idle)
    }

    /// Busy share in percent between `self` (earlier) and `later`.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        reason = "jiffy counts are far below 2^52"
    )]
    pub fn busy_pct_since(self, later: Self) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.busy_since(later) as f64 / total as f64
    }
}

/// The [`Ticks`] of `cpus` (`None`: the `cpu` line, all CPUs) in `/proc/stat`'s `text`.
///
/// # Errors
/// When a CPU's line is missing or malformed.
pub fn parse(text: &str, cpus: Option<&[usize]>) -> anyhow::Result<Ticks> {
    let names: Vec<String> = match cpus {
        None => vec!["cpu".to_owned()],
        Some(list) => list.iter().map(|c| format!("cpu{c}")).collect(),
    };
    let mut t = Ticks::default();
    for name in &names {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .with_context(|| format!("no {name} line in /proc/stat"))?;
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("malformed /proc/stat line {line:?}"))?;
        if v.len() < 5 {
            bail!("short /proc/stat line {line:?}");
        }
        t.total += v.iter().sum::<u64>();
        t.idle += v[3] + v[4];
    }
    Ok(t)
}

/// Reads `/proc/stat` now.
///
/// # Errors
/// As [`parse`], or when the file cannot be read.
pub fn read(cpus: Option<&[usize]>) -> anyhow::Result<Ticks> {
    parse(&std::fs::read_to_string("/proc/stat")?, cpus)
}

/// Jiffies per second (`sysconf(_SC_CLK_TCK)`).
#[must_use]
pub fn clk_tck() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100)
}

/// `usage_usec` of a cgroup v2 `cpu.stat` (present without the cpu controller).
///
/// # Errors
/// When the line is missing or malformed.
pub fn parse_cgroup_usage(text: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in cpu.stat {text:?}"))
}

/// `utime + stime` (jiffies) of a `/proc/<pid>/stat` line.
///
/// # Errors
/// When the line is malformed.
pub fn parse_task_ticks(text: &str) -> anyhow::Result<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("malformed /proc/<pid>/stat {text:?}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest: state(3) ppid(4) ... utime(14) stime(15) -> indexes 11 and 12 here.
    let get = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("malformed /proc/<pid>/stat {text:?}"))
    };
    Ok(get(11)? + get(12)?)
}

/// The pids of the `ksoftirqd/N` threads of `cpus` (`None`: every CPU).
#[must_use]
pub fn ksoftirqd_pids(cpus: Option<&[usize]>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| {
                c.trim().strip_prefix("ksoftirqd/").is_some_and(|n| {
                    n.parse::<usize>()
                        .is_ok_and(|n| cpus.is_none_or(|list| list.contains(&n)))
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 10 0 40 0 0 0
cpu0 60 0 30 390 5 0 30 0 0 0
cpu1 40 0 20 410 5 0 10 0 0 0
intr 1 2 3
";

    #[test]
    fn sums_the_asked_cpus() {
        assert_eq!(
            parse(STAT, None).unwrap(),
            Ticks {
                total: 1000,
                idle: 810
            }
        );
        assert_eq!(
            parse(STAT, Some(&[0])).unwrap(),
            Ticks {
                total: 515,
                idle: 395
            }
        );
        assert_eq!(parse(STAT, Some(&[0, 1])).unwrap().total, 1000);
        assert!(parse(STAT, Some(&[2])).is_err());
    }

    #[test]
    fn busy_between_two_reads() {
        let a = Ticks {
            total: 1000,
            idle: 800,
        };
        let b = Ticks {
            total: 1100,
            idle: 825,
        };
        assert_eq!(a.busy_since(b), 75);
        assert!((a.busy_pct_since(b) - 75.0).abs() < 1e-9);
        assert!((a.busy_pct_since(a)).abs() < 1e-9);
    }

    #[test]
    fn cgroup_and_task_times() {
        let stat = "usage_usec 4073908489\nuser_usec 3513404690\nsystem_usec 560503799\n";
        assert_eq!(parse_cgroup_usage(stat).unwrap(), 4_073_908_489);
        assert!(parse_cgroup_usage("user_usec 1\n").is_err());
        let task = "15 (ksoftirqd/0) S 2 0 0 0 -1 69238848 0 0 0 0 7 12 0 0 20 0 1 0 11 0 0";
        assert_eq!(parse_task_ticks(task).unwrap(), 19);
        let odd = "99 (a b) c) R 1 2 3 4 5 6 7 8 9 10 100 200 0 0";
        assert_eq!(parse_task_ticks(odd).unwrap(), 300);
        assert!(parse_task_ticks("garbage").is_err());
    }
}
