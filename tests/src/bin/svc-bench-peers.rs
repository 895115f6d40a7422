//! `cargo xtask bench peers`: kube-proxy's datapaths and svc's side by side (a benchmark, not a
//! test: it prints figures and stays out of CI).
//!
//! The same workload in every mode: `wrk` in a client pod -> `ClusterIP` 198.19.255.1:80 -> 3
//! nginx pods (one worker each, `return 200`), on one emulated node, with 1 / 1,000 / 10,000 /
//! 30,000 Services programmed (the measured one last). Modes: `none` (the pods directly, the
//! floor), `iptables`, `iptables-nft`, `nftables` (kube-proxy 1.33's rules), `ebpf-socket` and
//! `ebpf-tc` (svc-agent with `--socket-lb all` / `host-only`); see `svc_tests::peers`.
//!
//! Per cell (mode x Services): the full sync's time (median of `SYNC_REPS`), the memory the
//! rules or the agent hold, then `REPS` repetitions of a new-connection run (`Connection:
//! close`) and a keep-alive run (`--latency`), each `DUR` seconds, after a conntrack flush and a
//! quiet-machine check; medians. wrk and nginx are pinned (`PIN=one`: both on CPU 0), and the
//! busy time of the pinned CPUs divided by the requests is the whole path's CPU cost per
//! request; the difference to `none` is what the service translation adds.
//!
//! Knobs (environment): `MODES`, `SIZES`, `SKIP`, `REPS`, `SYNC_REPS`, `DUR`, `K`, `THREADS`,
//! `CONNS`, `PIN` (one|split|off), `QUIET_PCT`, `QUIET_WAIT`, `SYNC_TIMEOUT`, `PEERS_OUT_DIR`
//! (default `target/bench`). Writes `peers-<UTC>.md`, `.csv` (medians) and `.raw.csv` (every
//! repetition). Run as root with a release `svc-agent` next to this binary (or `SVC_AGENT_BIN`).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use svc_tests::{
    k8s,
    netns::require_root,
    peers::{
        Config, Mode,
        bed::Bed,
        report::{self, Cell},
        services,
    },
};

/// First line of what `program args` prints (stdout, else stderr), or why it could not run.
fn tool_version(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        }
        Err(e) => format!("{program}: not found ({e})"),
    }
}

/// The machine and the tools, for the report's header.
fn header(cfg: &Config, agent: Option<&Path>) -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        >> 20;
    let mut h = String::new();
    let _ = writeln!(
        h,
        "- kernel {}; {cpus} CPUs ({model}); {mem_gib} GiB",
        tool_version("uname", &["-r"])
    );
    let _ = writeln!(
        h,
        "- {}; nginx: {}; {} / {}; {}; {}",
        tool_version("wrk", &["-v"])
            .split(" Copyright")
            .next()
            .unwrap_or_default(),
        tool_version("nginx", &["-v"]).trim_start_matches("nginx version: "),
        tool_version("iptables-legacy", &["--version"]),
        tool_version("iptables-nft", &["--version"]),
        tool_version("nft", &["--version"]),
        tool_version("conntrack", &["--version"]),
    );
    if let Some(bin) = agent {
        let sha = fs::read(bin)
            .map(|b| {
                let d = ring::digest::digest(&ring::digest::SHA256, &b);
                d.as_ref()[..6].iter().fold(String::new(), |mut s, x| {
                    let _ = write!(s, "{x:02x}");
                    s
                })
            })
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "- {} ({}, sha256 {sha}), standalone (`run --from-dir`)",
            Bed::agent_version(bin),
            bin.display()
        );
    }
    let _ = writeln!(
        h,
        "- K={} backends; wrk -t{} -c{} -d{}s --latency; REPS={} (medians), SYNC_REPS={}; \
         PIN={:?}",
        cfg.k, cfg.threads, cfg.conns, cfg.dur, cfg.reps, cfg.sync_reps, cfg.pin
    );
    h
}

fn out_dir() -> PathBuf {
    std::env::var_os("PEERS_OUT_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    )
}

fn utc_stamp() -> String {
    tool_version("date", &["-u", "+%Y%m%dT%H%M%SZ"])
}

/// Checks that the translation happened where `mode` says, from the agent's counters before
/// the runs and now: at `connect()` for ebpf-socket (no packet DNAT'd), per packet for ebpf-tc
/// (no socket translated), at least once per measured connection. Returns the evidence line.
fn check_path(
    bed: &Bed,
    mode: Mode,
    services: u32,
    before: &BTreeMap<String, u64>,
    requests: u64,
) -> anyhow::Result<String> {
    let after = bed.counters()?;
    let d = |k: &str| {
        let get = |m: &BTreeMap<String, u64>| m.get(k).copied().unwrap_or(0);
        get(&after).saturating_sub(get(before))
    };
    let (sock, dnat, rev) = (d("sock_xlate"), d("dnat"), d("rev_nat"));
    if mode == Mode::EbpfSocket {
        ensure!(
            sock >= requests && dnat == 0,
            "ebpf-socket was not translated at connect(): sock_xlate +{sock} for {requests} \
             connections, dnat +{dnat}"
        );
    } else {
        ensure!(
            dnat >= requests && sock == 0,
            "ebpf-tc was not translated by TC: dnat +{dnat} for {requests} connections, \
             sock_xlate +{sock}"
        );
    }
    Ok(format!(
        "{mode} S={services}: during the runs sock_xlate +{sock}, dnat +{dnat}, rev_nat +{rev} \
         ({requests} new connections measured); node netfilter: {} conntrack entries",
        bed.conntrack_count()
    ))
}

/// Measures every size of one mode on one fresh node; appends the cells and evidence lines.
fn run_mode(
    cfg: &Config,
    mode: Mode,
    cells: &mut Vec<Cell>,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut bed = Bed::new(cfg, mode).with_context(|| format!("building the node for {mode}"))?;
    bed.validate_rules()?;
    let sizes: Vec<Option<u32>> = if mode == Mode::None {
        vec![None]
    } else {
        cfg.sizes.iter().copied().map(Some).collect()
    };
    for s in sizes {
        if let Some(n) = s
            && cfg.skipped(mode, n)
        {
            eprintln!("[peers] skip {mode} S={n} (SKIP)");
            continue;
        }
        let mut cell = Cell {
            mode: mode.name().to_owned(),
            services: s,
            ..Cell::default()
        };
        if let Some(n) = s {
            let svcs = services::services(n, &bed.backend_ips())?;
            let mut mem = Vec::new();
            let mut detail = String::new();
            for i in 0..cfg.sync_reps {
                let sync = if mode.is_ebpf() {
                    bed.start_agent(&svcs)?
                } else {
                    bed.load_rules(&svcs)?
                };
                eprintln!(
                    "[peers] {mode} S={n} sync {}: {:.0} ms, {:.1} MiB",
                    i + 1,
                    sync.ms,
                    sync.memory_mib
                );
                cell.sync_ms.push(sync.ms);
                mem.push(sync.memory_mib);
                detail = sync.detail;
            }
            cell.memory_mib = report::median(&mem);
            if !detail.is_empty() {
                notes.push(format!("{mode} S={n}: memory of the last sync: {detail}"));
            }
        }
        let url = bed.url();
        bed.probe(&url, mode == Mode::None)
            .with_context(|| format!("{mode} S={s:?}: the client gets no answer"))?;
        let before = if mode.is_ebpf() {
            Some(bed.counters()?)
        } else {
            None
        };
        // Warm-up.
        bed.wrk(&url, false, 1, cfg.threads, cfg.conns)?;
        for r in 0..cfg.reps {
            let rep = bed.rep()?;
            eprintln!(
                "[peers] {mode} S={} rep {}: new conn/s {:.0} ({:.0} % CPU, {:.1} µs), keep-alive \
                 req/s {:.0} p99 {:.0} µs ({:.0} % CPU, {:.1} µs), conntrack {}, bg {:.0} %",
                s.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                r + 1,
                rep.conn.rps,
                rep.conn_cpu_pct,
                rep.conn_cpu_us,
                rep.ka.rps,
                rep.ka.p99_us,
                rep.ka_cpu_pct,
                rep.ka_cpu_us,
                rep.conntrack,
                rep.bg_pct
            );
            cell.reps.push(rep);
        }
        if let Some(before) = before {
            let requests: u64 = cell.reps.iter().map(|r| r.conn.requests).sum();
            notes.push(check_path(&bed, mode, s.unwrap_or(0), &before, requests)?);
        }
        cells.push(cell);
    }
    bed.finish()
}

fn main() -> anyhow::Result<()> {
    require_root()?;
    let cfg = Config::from_env()?;
    let started = Instant::now();
    let agent = if cfg.modes.iter().any(|m| m.is_ebpf()) {
        Some(k8s::agent_binary()?)
    } else {
        None
    };
    for tool in [
        "wrk",
        "nginx",
        "taskset",
        "conntrack",
        "nft",
        "iptables-legacy-restore",
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            bail!("{tool} is not installed: run `cargo xtask bench peers` (it installs it)");
        }
    }
    let head = header(&cfg, agent.as_deref());
    eprint!("{head}");
    let mut cells = Vec::new();
    let mut notes = Vec::new();
    for &mode in &cfg.modes {
        run_mode(&cfg, mode, &mut cells, &mut notes)?;
    }
    let stamp = utc_stamp();
    let mut md = format!("# kube-proxy datapaths and svc side by side, {stamp}\n\n{head}\n");
    md.push_str(&report::markdown(&cells));
    md.push('\n');
    for n in &notes {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(md, "\n(run took {:.0} s)", started.elapsed().as_secs_f64());
    let dir = out_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = dir.join(format!("peers-{stamp}"));
    fs::write(base.with_extension("md"), &md)?;
    fs::write(base.with_extension("csv"), report::csv(&cells))?;
    fs::write(base.with_extension("raw.csv"), report::raw_csv(&cells))?;
    println!("{md}");
    eprintln!("[peers] wrote {}.{{md,csv,raw.csv}}", base.display());
    Ok(())
}
