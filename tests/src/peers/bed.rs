//! The measured node, for real (root): the harness's topology with a client pod and `K`
//! nginx backend pods on node 1, the rules or the agent of one mode, and wrk runs.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use svc_agent::inspect::{ServiceRow, StatRow, maps::MapRow};

use super::{
    Config, Mode, cpu, iptables, manifests, nftables,
    report::Rep,
    services::{self, MEASURED_VIP, PORT, ServiceSpec, TARGET_PORT},
    wrk::{self, WrkResult},
};
use crate::{
    k8s,
    netns::{Node, POD_IFNAME_PREFIX, Pod, Process, Topology},
};

/// nginx's configuration: one worker, no logs, `ok` on every path.
fn nginx_conf(dir: &Path, listen: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log error;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
         fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
         keepalive_requests 100000000;\n  \
         server {{ listen {listen} backlog=4096; location / {{ default_type text/plain; \
         return 200 \"ok\\n\"; }} }}\n}}\n"
    )
}

/// `taskset -c CPU` before `program` when pinned.
fn pinned(cpu: Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// Runs `cmd` to completion inside `ns` and the cgroup `cgroup` (it joins the cgroup, then
/// enters the namespace with `nsenter --net`, then execs), bounded by `timeout`; returns stdout.
fn run_in(
    ns: &Path,
    cgroup: &Path,
    cmd: &Command,
    env: &[(&str, String)],
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("svc-bench-peers")
        .arg(cgroup)
        .arg("timeout")
        .arg(timeout.as_secs().max(1).to_string())
        .arg("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(env.iter().map(|(k, v)| (k, v)));
    let line = format!("{sh:?}");
    let out = sh.output().with_context(|| format!("starting {line}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}\n{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// Memory the kernel holds in slab, vmalloc and per-CPU allocations (`/proc/meminfo`), KiB.
fn kernel_kib() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    let mut sum = 0;
    for key in ["Slab:", "VmallocUsed:", "Percpu:"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc/meminfo"))?;
        sum += line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("malformed {line:?}"))?;
    }
    Ok(sum)
}

/// What one sync produced.
#[derive(Clone, Debug)]
pub struct Sync {
    /// Wall time, ms.
    pub ms: f64,
    /// Memory, MiB (kernel delta for rules; agent RSS + BPF map memlock for svc).
    pub memory_mib: f64,
    /// What `memory_mib` is made of, when it is a sum.
    pub detail: String,
}

/// The running agent of an ebpf mode.
#[derive(Debug)]
struct AgentRun {
    process: Process,
}

/// One mode's emulated node with its pods. Dropping it stops the agent and nginx, then removes
/// the namespaces, mounts, cgroups and the run directory.
#[derive(Debug)]
pub struct Bed {
    agent: Option<AgentRun>,
    nginx: Vec<Process>,
    client: Pod,
    backends: Vec<Pod>,
    agent_bin: Option<PathBuf>,
    /// The `ksoftirqd` threads of the counted CPUs.
    ksoftirqd: Vec<u32>,
    cfg: Config,
    mode: Mode,
    dir: PathBuf,
    // Last: removed after the processes above stopped.
    topo: Topology,
}

impl Bed {
    /// Builds node 1 with a client pod and `cfg.k` nginx pods for `mode`.
    ///
    /// # Errors
    /// When something cannot be created or nginx does not answer.
    pub fn new(cfg: &Config, mode: Mode) -> anyhow::Result<Self> {
        let agent_bin = if mode.is_ebpf() {
            Some(k8s::agent_binary()?)
        } else {
            None
        };
        let mut topo = Topology::new()?;
        let client = topo.add_pod(0, "client")?;
        let mut backends = Vec::new();
        for i in 0..cfg.k {
            backends.push(topo.add_pod(0, &format!("be{i}"))?);
        }
        let dir = topo.run_dir().join("peers");
        fs::create_dir_all(&dir)?;
        let (_, srv_cpu) = cfg.pin.cpus();
        let mut nginx = Vec::new();
        for (i, be) in backends.iter().enumerate() {
            let d = dir.join(format!("be{i}"));
            fs::create_dir_all(&d)?;
            let conf = d.join("nginx.conf");
            fs::write(&conf, nginx_conf(&d, &format!("{}:{TARGET_PORT}", be.ipv4)))?;
            let mut cmd = pinned(srv_cpu, "nginx");
            cmd.arg("-e")
                .arg(d.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]);
            nginx.push(
                be.spawn(&cmd)
                    .with_context(|| format!("starting nginx in {}", be.name))?,
            );
        }
        fs::write(dir.join("spread.lua"), wrk::SPREAD_LUA)?;
        let bed = Self {
            agent: None,
            nginx,
            client,
            backends,
            agent_bin,
            ksoftirqd: cpu::ksoftirqd_pids(cfg.pin.counted().as_deref()),
            cfg: cfg.clone(),
            mode,
            dir,
            topo,
        };
        // Every backend answers its own address (bounded wait for nginx to listen).
        for be in &bed.backends {
            bed.probe(&format!("http://{}:{TARGET_PORT}/", be.ipv4), false)
                .with_context(|| format!("nginx in {} does not answer", be.name))?;
        }
        Ok(bed)
    }

    /// The emulated node.
    #[must_use]
    pub fn node(&self) -> &Node {
        self.topo.node(0)
    }

    /// The backends' addresses.
    #[must_use]
    pub fn backend_ips(&self) -> Vec<Ipv4Addr> {
        self.backends.iter().map(|b| b.ipv4).collect()
    }

    /// The URL the client loads.
    #[must_use]
    pub fn url(&self) -> String {
        if self.mode == Mode::None {
            format!("http://{}:{TARGET_PORT}/", self.backends[0].ipv4)
        } else {
            format!("http://{MEASURED_VIP}:{PORT}/")
        }
    }

    /// The CPU time, µs, of everything this node does: its cgroup (wrk, nginx, the idle
    /// agent, and the softirq work that ran while one of them was on the CPU) plus the counted
    /// CPUs' `ksoftirqd` threads (softirq work deferred to them).
    ///
    /// # Errors
    /// When `cpu.stat` cannot be read.
    pub fn own_usec(&self) -> anyhow::Result<u64> {
        let stat = fs::read_to_string(self.node().cgroup.join("cpu.stat"))
            .context("reading the node cgroup's cpu.stat")?;
        let mut usec = cpu::parse_cgroup_usage(&stat)?;
        let per_tick = 1_000_000 / cpu::clk_tck().max(1);
        for pid in &self.ksoftirqd {
            if let Ok(t) = fs::read_to_string(format!("/proc/{pid}/stat")) {
                usec += cpu::parse_task_ticks(&t)? * per_tick;
            }
        }
        Ok(usec)
    }

    /// One wrk run from the client pod (in its cgroup, below the node's), pinned per `PIN`;
    /// returns its figures, the node's own CPU µs ([`own_usec`](Self::own_usec)) during it,
    /// and its wall time.
    ///
    /// # Errors
    /// When wrk fails or prints no figures.
    pub fn wrk(
        &self,
        url: &str,
        close: bool,
        secs: u64,
        threads: u32,
        conns: u32,
    ) -> anyhow::Result<(WrkResult, u64, Duration)> {
        let (wrk_cpu, _) = self.cfg.pin.cpus();
        let script = self.dir.join("spread.lua");
        let spread = (self.mode == Mode::None).then(|| script.to_string_lossy().into_owned());
        let mut cmd = pinned(wrk_cpu, "wrk");
        cmd.args(wrk::args(
            threads,
            conns,
            secs,
            close,
            spread.as_deref(),
            url,
        ));
        let pods: Vec<String> = self.backends.iter().map(|b| b.ipv4.to_string()).collect();
        let env = [("PODS", pods.join(" ")), ("PORT", TARGET_PORT.to_string())];
        let before = self.own_usec()?;
        let t0 = Instant::now();
        let out = run_in(
            self.client.ns.path(),
            &self.client.cgroup,
            &cmd,
            &env,
            Duration::from_secs(secs + 30),
        )?;
        let wall = t0.elapsed();
        let own = self.own_usec()?.saturating_sub(before);
        Ok((wrk::parse(&out)?, own, wall))
    }

    /// Waits (at most 10 one-second tries) until `url` answers a short wrk run without errors.
    ///
    /// # Errors
    /// When it never does.
    pub fn probe(&self, url: &str, spread: bool) -> anyhow::Result<()> {
        let threads = if spread { self.cfg.k } else { 1 };
        let mut last = String::new();
        for _ in 0..10 {
            match self.wrk(url, false, 1, threads, threads) {
                Ok((r, ..)) if r.requests > 0 && r.errors == 0 => return Ok(()),
                Ok((r, ..)) => last = format!("{} requests, {} errors", r.requests, r.errors),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("{url} from the client pod: {last}")
    }

    /// Busy % of the counted CPUs over one second; waits (at most `QUIET_WAIT` s) for it to
    /// drop to `QUIET_PCT`, and returns the last figure.
    ///
    /// # Errors
    /// When `/proc/stat` cannot be read.
    pub fn wait_quiet(&self) -> anyhow::Result<f64> {
        let counted = self.cfg.pin.counted();
        let deadline = Instant::now() + Duration::from_secs(self.cfg.quiet_wait);
        loop {
            let a = cpu::read(counted.as_deref())?;
            std::thread::sleep(Duration::from_secs(1));
            let pct = a.busy_pct_since(cpu::read(counted.as_deref())?);
            if pct <= self.cfg.quiet_pct || Instant::now() >= deadline {
                if pct > self.cfg.quiet_pct {
                    eprintln!(
                        "WARNING: the counted CPUs were {pct:.0} % busy before the run (other \
                         processes share them)"
                    );
                }
                return Ok(pct);
            }
        }
    }

    /// Entries in the node's conntrack table (0 without conntrack).
    #[must_use]
    pub fn conntrack_count(&self) -> u64 {
        self.node()
            .ns
            .exec(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// One repetition: conntrack flushed, a quiet check, a new-connection run, a keep-alive
    /// run.
    ///
    /// # Errors
    /// When a run fails.
    pub fn rep(&self) -> anyhow::Result<Rep> {
        let ns = &self.node().ns;
        let _ = ns.exec(["conntrack", "-F"]);
        let bg_pct = self.wait_quiet()?;
        let url = self.url();
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per = |own: u64, n: u64| own as f64 / n.max(1) as f64;
        let cpus = self.cfg.pin.counted().map_or_else(
            || std::thread::available_parallelism().map_or(1, usize::from),
            |c| c.len(),
        );
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let pct = |own: u64, wall: Duration| {
            100.0 * own as f64 / (wall.as_secs_f64() * 1e6 * cpus as f64)
        };
        let (c, c_own, c_wall) =
            self.wrk(&url, true, self.cfg.dur, self.cfg.threads, self.cfg.conns)?;
        let conntrack = self.conntrack_count();
        let (k, k_own, k_wall) =
            self.wrk(&url, false, self.cfg.dur, self.cfg.threads, self.cfg.conns)?;
        Ok(Rep {
            conn_cpu_pct: pct(c_own, c_wall),
            conn_cpu_us: per(c_own, c.requests),
            conntrack,
            ka_cpu_pct: pct(k_own, k_wall),
            ka_cpu_us: per(k_own, k.requests),
            conn: c,
            ka: k,
            bg_pct,
        })
    }

    // -----------------------------------------------------------------------------------------
    // kube-proxy's rules
    // -----------------------------------------------------------------------------------------

    fn restore_cmd(&self) -> &'static str {
        if self.mode == Mode::IptablesNft {
            "iptables-nft-restore"
        } else {
            "iptables-legacy-restore"
        }
    }

    /// Checks that the tools accept the rules rendered for 2 Services (`iptables-restore
    /// --test`, `nft -c -f`) in this node's namespace, before anything is timed.
    ///
    /// # Errors
    /// With the tool's complaint.
    pub fn validate_rules(&self) -> anyhow::Result<()> {
        let svcs = services::services(2, &self.backend_ips())?;
        let ns = &self.node().ns;
        match self.mode {
            Mode::Iptables | Mode::IptablesNft => {
                let f = self.dir.join("check.iptables");
                fs::write(&f, iptables::render(&svcs))?;
                ns.exec([
                    self.restore_cmd().as_ref(),
                    "--test".as_ref(),
                    f.as_os_str(),
                ])
                .context("iptables-restore --test rejects the rendered rules")?;
            }
            Mode::Nftables => {
                let f = self.dir.join("check.nft");
                fs::write(&f, nftables::render(&svcs))?;
                ns.exec(["nft".as_ref(), "-c".as_ref(), "-f".as_ref(), f.as_os_str()])
                    .context("nft -c rejects the rendered ruleset")?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Loads kube-proxy's rules for `svcs` into empty tables with one restore (the timed
    /// part); returns its wall time and the kernel memory it added.
    ///
    /// # Errors
    /// When the tool fails.
    pub fn load_rules(&self, svcs: &[ServiceSpec]) -> anyhow::Result<Sync> {
        let ns = &self.node().ns;
        let (file, text) = match self.mode {
            Mode::Nftables => ("rules.nft", nftables::render(svcs)),
            _ => ("rules.iptables", iptables::render(svcs)),
        };
        let f = self.dir.join(file);
        fs::write(&f, text)?;
        // Empty tables first (untimed).
        match self.mode {
            Mode::Nftables => {
                let _ = ns.exec(["nft", "delete", "table", nftables::TABLE]);
            }
            Mode::IptablesNft => {
                ns.exec(["nft", "flush", "ruleset"])?;
            }
            _ => {
                for t in ["nat", "filter"] {
                    ns.exec(["iptables-legacy", "-t", t, "-F"])?;
                    ns.exec(["iptables-legacy", "-t", t, "-X"])?;
                }
            }
        }
        let k0 = kernel_kib()?;
        let t0 = Instant::now();
        match self.mode {
            Mode::Nftables => ns.exec(["nft".as_ref(), "-f".as_ref(), f.as_os_str()])?,
            _ => ns.exec([self.restore_cmd().as_ref(), f.as_os_str()])?,
        };
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        #[expect(clippy::cast_precision_loss, reason = "KiB counts far below 2^52")]
        let memory_mib = (kernel_kib()? as f64 - k0 as f64) / 1024.0;
        Ok(Sync {
            ms,
            memory_mib,
            detail: String::new(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // svc's agent
    // -----------------------------------------------------------------------------------------

    fn agent_cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = self.agent_bin.as_deref().context("not an ebpf mode")?;
        k8s::agent_command(bin, &self.node().bpffs, args)
    }

    /// Stops the agent (if any) and removes its pins: the next start is a cold one.
    ///
    /// # Errors
    /// When the agent does not stop or `cleanup` fails.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(run) = self.agent.take() {
            let (status, log) = run.process.stop_with_output()?;
            ensure!(status.success(), "svc-agent ended with {status}:\n{log}");
            self.agent_cmd(&["cleanup"])?;
        }
        Ok(())
    }

    /// Starts a fresh agent following the manifests of `svcs` (written first, untimed) and
    /// waits for its "svc-agent running" line (logged after its first full sync); returns the
    /// time from spawning it to that line, and its RSS plus its maps' memlock. Then checks
    /// that it programmed every Service, the measured one with every backend.
    ///
    /// # Errors
    /// When it does not start or programmed something else.
    pub fn start_agent(&mut self, svcs: &[ServiceSpec]) -> anyhow::Result<Sync> {
        self.stop_agent()?;
        let node = self.node().clone();
        let mdir = self.dir.join("manifests");
        let _ = fs::remove_dir_all(&mdir);
        fs::create_dir_all(&mdir)?;
        fs::write(
            mdir.join("node.yaml"),
            k8s::documents(&[k8s::node_yaml(&node)]),
        )?;
        fs::write(
            mdir.join("services.yaml"),
            manifests::render(svcs, &node.name),
        )?;
        let socket_lb = if self.mode == Mode::EbpfTc {
            "host-only"
        } else {
            "all"
        };
        let bin = self.agent_bin.clone().context("not an ebpf mode")?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--bpffs")
            .arg(&node.bpffs)
            .args(["run", "--node-name", &node.name, "--pod-ifaces"])
            .arg(format!("{POD_IFNAME_PREFIX}*"))
            .args(["--node-ifaces", "eth0", "--from-dir"])
            .arg(&mdir)
            .arg("--cgroup")
            .arg(&node.cgroup)
            .args(["--socket-lb", socket_lb])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let t0 = Instant::now();
        let mut process = node.spawn(&cmd)?;
        process.wait_for_output(
            "svc-agent running",
            Duration::from_secs(self.cfg.sync_timeout),
        )?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let rss = crate::procfs::status_kib(process.pid(), "VmRSS")?;
        self.agent = Some(AgentRun { process });
        let maps: Vec<MapRow> =
            serde_json::from_str(&self.agent_cmd(&["inspect", "maps", "-o", "json"])?)
                .context("parsing inspect maps -o json")?;
        let memlock: u64 = maps.iter().map(|m| m.memlock_bytes).sum();
        self.check_programmed(svcs)?;
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
        Ok(Sync {
            ms,
            memory_mib: mib(rss * 1024 + memlock),
            detail: format!(
                "agent RSS {:.1} MiB + BPF maps' memlock {:.1} MiB (default map sizes)",
                mib(rss * 1024),
                mib(memlock)
            ),
        })
    }

    /// The agent's frontends: every Service's `ClusterIP`, the measured one with all backends.
    fn check_programmed(&self, svcs: &[ServiceSpec]) -> anyhow::Result<()> {
        let rows: Vec<ServiceRow> =
            serde_json::from_str(&self.agent_cmd(&["inspect", "services", "-o", "json"])?)
                .context("parsing inspect services -o json")?;
        let cluster_ips = rows.iter().filter(|r| r.kind == "ClusterIP").count();
        ensure!(
            cluster_ips == svcs.len(),
            "the agent programmed {cluster_ips} ClusterIP frontends, expected {}",
            svcs.len()
        );
        let fe = format!("{MEASURED_VIP}:{PORT}");
        let row = rows
            .iter()
            .find(|r| r.frontend == fe)
            .with_context(|| format!("no frontend {fe}"))?;
        let mut got: Vec<String> = row
            .backends
            .iter()
            .filter(|b| b.state == "ready")
            .map(|b| b.endpoint.clone())
            .collect();
        got.sort();
        let mut want: Vec<String> = self
            .backend_ips()
            .iter()
            .map(|ip| format!("{ip}:{TARGET_PORT}"))
            .collect();
        want.sort();
        ensure!(got == want, "{fe} has backends {got:?}, expected {want:?}");
        Ok(())
    }

    /// The agent's packet counters (`inspect stats`), by name.
    ///
    /// # Errors
    /// When `inspect` fails.
    pub fn counters(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let rows: Vec<StatRow> =
            serde_json::from_str(&self.agent_cmd(&["inspect", "stats", "-o", "json"])?)
                .context("parsing inspect stats -o json")?;
        Ok(rows
            .into_iter()
            .filter(|r| r.kind == "packet")
            .map(|r| (r.name, r.packets))
            .collect())
    }

    /// What `svc-agent --version` says.
    #[must_use]
    pub fn agent_version(bin: &Path) -> String {
        Command::new(bin).arg("--version").output().map_or_else(
            |e| format!("unknown ({e})"),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
    }

    /// Stops what runs, then removes everything (the topology's guard).
    ///
    /// # Errors
    /// When the agent ended badly.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.stop_agent()?;
        for p in std::mem::take(&mut self.nginx) {
            let _ = p.stop();
        }
        let prefix = self.topo.prefix().to_owned();
        drop(self);
        let left = crate::netns::leftovers(&prefix)?;
        ensure!(left.is_empty(), "left behind: {left:?}");
        Ok(())
    }
}
