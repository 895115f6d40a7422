//! `svc-bench-peers` (`cargo xtask bench peers`): the same workload, a client pod -> a
//! `ClusterIP` -> 3 backend pods, through kube-proxy's datapaths and svc's, at 1 / 1,000 /
//! 10,000 / 30,000 Services, in one process run.
//!
//! Modes ([`Mode`]):
//! - `none`: no Service; the client talks to the pods directly (wrk thread `i` to pod `i`), the
//!   floor every other mode is compared with;
//! - `iptables` / `iptables-nft`: kube-proxy's iptables rules ([`iptables`]) loaded by one
//!   `iptables-legacy-restore` / `iptables-nft-restore`;
//! - `nftables`: kube-proxy's nftables table ([`nftables`]) loaded by one `nft -f`;
//! - `ebpf-socket`: `svc-agent run --from-dir` with `--socket-lb all` (the default): the client
//!   runs in the cgroup the agent attached its connect-time programs to, so its connections go to
//!   a backend from `connect()` on;
//! - `ebpf-tc`: the agent with `--socket-lb host-only`: pods' packets are translated one by one
//!   by the TC programs on the pod-facing interfaces.
//!
//! The emulated node is node 1 of the harness's [`Topology`](crate::netns::Topology) (its own
//! namespace, bpffs and cgroup); the client and the backends are pods on it, wired like the ptp
//! CNI. Everything is rebuilt for each mode, so no rule, hook or program of one mode is left for
//! the next. The pure parts (rule rendering, manifests, wrk parsing, CPU accounting, medians,
//! the table) are unit-tested here; [`bed`] runs them for real (root).

pub mod bed;
pub mod cpu;
pub mod iptables;
pub mod manifests;
pub mod nftables;
pub mod report;
pub mod services;
pub mod wrk;

use std::{fmt, str::FromStr};

use anyhow::{Context as _, bail};

/// One datapath under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// No Service: the client talks to the pods' addresses.
    None,
    /// kube-proxy's iptables mode, `iptables-legacy-restore`.
    Iptables,
    /// kube-proxy's iptables mode through `iptables-nft-restore` (`nf_tables` underneath).
    IptablesNft,
    /// kube-proxy's nftables mode.
    Nftables,
    /// svc, pods translated at `connect()` (`--socket-lb all`).
    EbpfSocket,
    /// svc, pods translated per packet by TC (`--socket-lb host-only`).
    EbpfTc,
}

impl Mode {
    /// Every mode, in the order the table shows them by default.
    pub const ALL: [Self; 6] = [
        Self::None,
        Self::Iptables,
        Self::IptablesNft,
        Self::Nftables,
        Self::EbpfSocket,
        Self::EbpfTc,
    ];

    /// Its name (`MODES`, the table).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Iptables => "iptables",
            Self::IptablesNft => "iptables-nft",
            Self::Nftables => "nftables",
            Self::EbpfSocket => "ebpf-socket",
            Self::EbpfTc => "ebpf-tc",
        }
    }

    /// Whether svc's agent is the datapath.
    #[must_use]
    pub fn is_ebpf(self) -> bool {
        matches!(self, Self::EbpfSocket | Self::EbpfTc)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                format!("unknown mode {s:?}: expected one of {}", names.join(", "))
            })
    }
}

/// Where wrk and nginx run (and so which CPUs' time is counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// wrk, nginx and so all softirq work on CPU 0: every rate is the inverse of the whole
    /// path's CPU cost, and the other CPU soaks up background work.
    One,
    /// wrk on CPU 0, nginx on CPU 1.
    Split,
    /// The scheduler decides; every CPU is counted.
    Off,
}

impl Pin {
    /// The CPU for wrk and for nginx (`None`: unpinned).
    #[must_use]
    pub fn cpus(self) -> (Option<usize>, Option<usize>) {
        match self {
            Self::One => (Some(0), Some(0)),
            Self::Split => (Some(0), Some(1)),
            Self::Off => (None, None),
        }
    }

    /// The CPUs whose time is counted (`None`: all).
    #[must_use]
    pub fn counted(self) -> Option<Vec<usize>> {
        match self {
            Self::One => Some(vec![0]),
            Self::Split => Some(vec![0, 1]),
            Self::Off => None,
        }
    }
}

impl FromStr for Pin {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "one" => Ok(Self::One),
            "split" => Ok(Self::Split),
            "off" => Ok(Self::Off),
            _ => bail!("PIN={s:?}: expected one, split or off"),
        }
    }
}

/// The run's knobs, from the environment (see [`Config::from_lookup`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `MODES` (default `none iptables nftables ebpf-socket ebpf-tc`).
    pub modes: Vec<Mode>,
    /// `SIZES`, Service counts (default `1 1000 10000 30000`).
    pub sizes: Vec<u32>,
    /// `SKIP`, `mode:S` cells not run (default `nftables:30000`: one `nft -f` of 30,000
    /// Services takes about 9 minutes here).
    pub skip: Vec<(Mode, u32)>,
    /// `REPS`, repetitions per cell (default 3; medians).
    pub reps: u32,
    /// `SYNC_REPS`, full syncs per cell (default `REPS`; median).
    pub sync_reps: u32,
    /// `DUR`, seconds per wrk run (default 8).
    pub dur: u64,
    /// `K`, backends (default 3).
    pub k: u32,
    /// `THREADS`, wrk threads (default `K`).
    pub threads: u32,
    /// `CONNS`, wrk connections (default `10 K`).
    pub conns: u32,
    /// `PIN` (default `one`).
    pub pin: Pin,
    /// `QUIET_PCT`: before each repetition wait until the counted CPUs are busier than this
    /// for at most ...
    pub quiet_pct: f64,
    /// ... `QUIET_WAIT` seconds (default 5 % and 120 s).
    pub quiet_wait: u64,
    /// `SYNC_TIMEOUT`: bound on one agent's first sync, s (default 600).
    pub sync_timeout: u64,
}

fn words(v: &str) -> impl Iterator<Item = &str> {
    v.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
}

impl Config {
    /// The knobs from the process environment.
    ///
    /// # Errors
    /// When a variable holds something it cannot be.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// The knobs from `get` (a variable's value, `None` when unset).
    ///
    /// # Errors
    /// When a variable holds something it cannot be.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        fn num<T: FromStr>(get: &dyn Fn(&str) -> Option<String>, k: &str, d: T) -> anyhow::Result<T>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            match get(k) {
                Some(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{k}={v:?} is not a valid number")),
                _ => Ok(d),
            }
        }
        let get: &dyn Fn(&str) -> Option<String> = &get;
        let modes = get("MODES")
            .unwrap_or_else(|| "none iptables nftables ebpf-socket ebpf-tc".to_owned())
            .pipe(|v| {
                words(&v)
                    .map(str::parse)
                    .collect::<anyhow::Result<Vec<Mode>>>()
            })?;
        let sizes = get("SIZES")
            .unwrap_or_else(|| "1 1000 10000 30000".to_owned())
            .pipe(|v| {
                words(&v)
                    .map(|w| {
                        let s: u32 = w.parse().with_context(|| format!("SIZES: {w:?}"))?;
                        anyhow::ensure!(
                            (1..=services::MAX_SERVICES).contains(&s),
                            "SIZES: {s} is not in 1..={}",
                            services::MAX_SERVICES
                        );
                        Ok(s)
                    })
                    .collect::<anyhow::Result<Vec<u32>>>()
            })?;
        let skip = get("SKIP")
            .unwrap_or_else(|| "nftables:30000".to_owned())
            .pipe(|v| {
                words(&v)
                    .map(|w| {
                        let (m, s) = w
                            .split_once(':')
                            .with_context(|| format!("SKIP: {w:?} is not mode:S"))?;
                        Ok((
                            m.parse()?,
                            s.parse().with_context(|| format!("SKIP: {w:?}"))?,
                        ))
                    })
                    .collect::<anyhow::Result<Vec<(Mode, u32)>>>()
            })?;
        let reps: u32 = num(get, "REPS", 3)?;
        let k: u32 = num(get, "K", 3)?;
        anyhow::ensure!(
            modes.iter().all(|m| Mode::ALL.contains(m)) && !modes.is_empty(),
            "MODES is empty"
        );
        anyhow::ensure!(!sizes.is_empty(), "SIZES is empty");
        anyhow::ensure!(reps >= 1, "REPS must be at least 1");
        anyhow::ensure!((1..=32).contains(&k), "K={k}: expected 1 to 32 backends");
        let cfg = Self {
            modes,
            sizes,
            skip,
            reps,
            sync_reps: num(get, "SYNC_REPS", reps)?.max(1),
            dur: num(get, "DUR", 8)?,
            k,
            threads: num(get, "THREADS", k)?,
            conns: num(get, "CONNS", 10 * k)?,
            pin: get("PIN").unwrap_or_else(|| "one".to_owned()).parse()?,
            quiet_pct: num(get, "QUIET_PCT", 5.0)?,
            quiet_wait: num(get, "QUIET_WAIT", 120)?,
            sync_timeout: num(get, "SYNC_TIMEOUT", 600)?,
        };
        anyhow::ensure!(cfg.dur >= 1, "DUR must be at least 1 s");
        anyhow::ensure!(
            cfg.threads >= 1 && cfg.conns >= cfg.threads,
            "wrk needs THREADS >= 1 and CONNS >= THREADS"
        );
        Ok(cfg)
    }

    /// Whether the cell `mode` x `services` is skipped.
    #[must_use]
    pub fn skipped(&self, mode: Mode, services: u32) -> bool {
        self.skip.contains(&(mode, services))
    }
}

/// `value.pipe(f)` = `f(value)`, to keep the knob parsing in one expression each.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_issues() {
        let c = cfg(&[]).unwrap();
        assert_eq!(
            c.modes,
            [
                Mode::None,
                Mode::Iptables,
                Mode::Nftables,
                Mode::EbpfSocket,
                Mode::EbpfTc
            ]
        );
        assert_eq!(c.sizes, [1, 1000, 10_000, 30_000]);
        assert!(c.skipped(Mode::Nftables, 30_000));
        assert!(!c.skipped(Mode::Iptables, 30_000));
        assert_eq!(
            (c.reps, c.sync_reps, c.dur, c.k, c.threads, c.conns),
            (3, 3, 8, 3, 3, 30)
        );
        assert_eq!(c.pin, Pin::One);
    }

    #[test]
    fn knobs_parse_and_bad_values_say_which() {
        let c = cfg(&[
            ("MODES", "none,ebpf-tc"),
            ("SIZES", "1 10000"),
            ("SKIP", ""),
            ("REPS", "5"),
            ("K", "2"),
            ("PIN", "split"),
        ])
        .unwrap();
        assert_eq!(c.modes, [Mode::None, Mode::EbpfTc]);
        assert_eq!(c.sizes, [1, 10_000]);
        assert!(c.skip.is_empty());
        assert_eq!((c.reps, c.sync_reps, c.threads, c.conns), (5, 5, 2, 20));
        assert_eq!(c.pin.counted(), Some(vec![0, 1]));
        let err = |v: &[(&str, &str)]| format!("{:#}", cfg(v).unwrap_err());
        assert!(err(&[("MODES", "ipvs")]).contains("unknown mode \"ipvs\""));
        assert!(err(&[("SIZES", "0")]).contains("SIZES"));
        assert!(err(&[("REPS", "x")]).contains("REPS"));
        assert!(err(&[("PIN", "two")]).contains("PIN"));
        assert!(err(&[("SKIP", "nftables")]).contains("mode:S"));
    }
}
