//! Packet fixture runner: table rows run through `BPF_PROG_TEST_RUN` (aya `TestRun`).
//!
//! A row names a program, the map entries it needs (a setup function over the freshly loaded
//! object), an input frame, the expected verdict, the expected output frame (compared byte for
//! byte) and the expected counter deltas. Every row gets its own freshly loaded object, so rows
//! never see each other's state. A mismatch reports the row and both frames decoded (addresses,
//! ports, checksums with their validity) plus the first differing byte.
//!
//! With a sample count above one, the row is then timed: the program runs that many more times,
//! each run on a fresh copy of the row's input (the kernel's own `repeat` would run later
//! iterations on the frame the first one rewrote, timing the wrong path), and the median of the
//! kernel-measured durations is reported. Later runs see the map state earlier runs left, which
//! is what a flow's second and later packets see; a row that times something else (a new
//! connection per packet) gives each timed run its own input ([`Fixture::timed_inputs`]).
//!
//! A row with an [`Uplink`] runs (setup, checked run, timed runs) in a network namespace of its
//! own, built for it and deleted after it, with the frame arriving on the uplink's interface
//! (`ingress_ifindex` and `ifindex` of the run's context): the kernel's FIB and neighbour
//! tables the programs consult (`bpf_fib_lookup`) are that namespace's. Other rows run in the
//! test's own namespace, whose tables they never read.

use std::{
    cell::Cell,
    fmt::Write as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
    programs::{Program, TestRun, TestRunOptions},
};
use svc_agent::loader::{self, Globals, MapSizes};
use svc_common::{
    stats::{Counter, DropReason, PktCounter},
    tc_clients::{TC_CLIENTS_READY, TcClientsReady},
};

use crate::{
    netns::{Netns, TEST_PREFIX},
    packets::describe,
};

/// Verdicts a program can return: TC's (`TC_ACT_*`) and XDP's (`XDP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `TCX_NEXT` (`TC_ACT_UNSPEC`, -1): on to the hook's next program, then on its way. What
    /// the pod programs return for every packet they let through, translated or not.
    Next,
    /// `TC_ACT_OK` (`TCX_PASS`): continue into the stack, ending the hook's chain.
    Ok,
    /// `TC_ACT_SHOT`: drop.
    Shot,
    /// `TC_ACT_REDIRECT`: sent elsewhere by `bpf_redirect`.
    Redirect,
    /// `XDP_DROP`.
    XdpDrop,
    /// `XDP_PASS`: on to the stack (and the TC programs).
    XdpPass,
    /// `XDP_TX`: sent back out of the interface it arrived on.
    XdpTx,
    /// `XDP_REDIRECT`: sent out of another interface by `bpf_redirect`.
    XdpRedirect,
}

impl Verdict {
    /// The value the program returns for this verdict.
    #[must_use]
    pub const fn code(self) -> u32 {
        match self {
            Self::Next => u32::MAX,
            Self::Ok => 0,
            // TC_ACT_SHOT and XDP_PASS share the number.
            Self::Shot | Self::XdpPass => 2,
            Self::Redirect => 7,
            Self::XdpDrop => 1,
            Self::XdpTx => 3,
            Self::XdpRedirect => 4,
        }
    }
}

/// What the output frame must be.
#[derive(Clone, Debug)]
pub enum Expected {
    /// Exactly the input frame.
    Unchanged,
    /// Exactly these bytes.
    Packet(Vec<u8>),
}

/// Writes the map entries a row needs into the freshly loaded object.
pub type Setup = fn(&mut Ebpf) -> anyhow::Result<()>;

/// Checks map state after the row's run (the row is given for its input length and program).
pub type Check = fn(&Ebpf, &Fixture) -> anyhow::Result<()>;

/// The input of the `n`-th timed run of a row (see [`Fixture::timed_inputs`]).
pub type TimedInput = fn(u32) -> Vec<u8>;

/// The network a row's program runs in: a namespace of its own (see the module doc), built with
/// `sysctls` and then the `ip` batch lines (interfaces, addresses, routes, neighbours), the
/// frame arriving on interface `dev`.
#[derive(Clone, Copy, Debug)]
pub struct Uplink {
    /// `key=value` sysctls set first (forwarding, which the FIB lookup checks on `dev`).
    pub sysctls: &'static [&'static str],
    /// `ip -batch` lines, one command each.
    pub ip: &'static [&'static str],
    /// The interface the frame arrives on.
    pub dev: &'static str,
}

/// One row of a fixture table.
#[derive(Clone)]
pub struct Fixture {
    /// Unique row name (what `cargo test ... -- NAME` selects).
    pub name: String,
    /// Name of the program under test in the eBPF object.
    pub program: &'static str,
    /// Map entries the row needs, written before the run.
    pub setup: Option<Setup>,
    /// The frame given to the program.
    pub input: Vec<u8>,
    /// The verdict the program must return.
    pub verdict: Verdict,
    /// The frame the program must leave behind.
    pub output: Expected,
    /// Parser counters that must have moved by exactly these packet counts; all others by 0.
    pub counters: Vec<(PktCounter, u64)>,
    /// Drop reasons that must have moved by exactly these packet counts; all others by 0.
    pub drops: Vec<(DropReason, u64)>,
    /// Map sizes for this row's object (small unless the row says otherwise).
    pub sizes: MapSizes,
    /// Load-time constants of this row's object (the defaults unless the row says otherwise).
    pub globals: Globals,
    /// The network the row runs in (the test's own namespace when `None`).
    pub uplink: Option<Uplink>,
    /// Map state to check after the run, beyond the counters above.
    pub check: Option<Check>,
    /// When set, timed run `n` gets this input instead of the row's (for example the SYN of
    /// the `n`-th new connection, so every timed run takes the new-flow path); the checked
    /// run still uses `input`.
    pub timed_inputs: Option<TimedInput>,
}

impl Fixture {
    /// A row for `program` that expects `input` to pass unchanged, on to the hook's next
    /// program (`TCX_NEXT`).
    #[must_use]
    pub fn passes(name: &str, program: &'static str, input: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            program,
            setup: None,
            input,
            verdict: Verdict::Next,
            output: Expected::Unchanged,
            counters: Vec::new(),
            drops: Vec::new(),
            sizes: MapSizes::small(),
            globals: Globals::default(),
            uplink: None,
            check: None,
            timed_inputs: None,
        }
    }

    /// A row for `program` that expects `input` to leave as `output`, on to the hook's next
    /// program (`TCX_NEXT`).
    #[must_use]
    pub fn rewrites(name: &str, program: &'static str, input: Vec<u8>, output: Vec<u8>) -> Self {
        Self {
            output: Expected::Packet(output),
            ..Self::passes(name, program, input)
        }
    }

    /// A row for `program` that expects `input` to be dropped for `reason`.
    #[must_use]
    pub fn drops(name: &str, program: &'static str, input: Vec<u8>, reason: DropReason) -> Self {
        Self {
            verdict: Verdict::Shot,
            drops: vec![(reason, 1)],
            ..Self::passes(name, program, input)
        }
    }

    /// Sets the map entries the row needs.
    #[must_use]
    pub fn with_setup(mut self, setup: Setup) -> Self {
        self.setup = Some(setup);
        self
    }

    /// Sets the counters this row must move (one packet each unless given).
    #[must_use]
    pub fn counts(mut self, counters: &[PktCounter]) -> Self {
        self.counters = counters.iter().map(|c| (*c, 1)).collect();
        self
    }
}

/// Outcome of a passing row.
#[derive(Debug)]
pub struct Report {
    /// Median kernel-measured time of one run, when timing was asked for.
    pub per_packet: Option<Duration>,
}

/// Room for programs that grow a packet (generated ICMP errors and the like).
const OUT_HEADROOM: usize = 256;

/// Runs one row: checks verdict, output bytes and counters, then (if `repeat > 1`) times
/// `repeat` single runs. A row with an [`Uplink`] runs in its namespace, removed afterwards.
pub fn run(fixture: &Fixture, repeat: u32) -> anyhow::Result<Report> {
    let Some(uplink) = fixture.uplink else {
        return run_here(fixture, repeat);
    };
    let ns = RowNetns::build(&uplink)?;
    ns.netns.run(|| {
        let ifindex = nix::net::if_::if_nametoindex(uplink.dev)
            .with_context(|| format!("interface {} of the row's namespace", uplink.dev))?;
        ARRIVES_ON.set(ifindex);
        run_here(fixture, repeat)
    })
}

thread_local! {
    /// The interface index frames of this thread's runs arrive on (0: none given, the test
    /// runner's default: the namespace's loopback, `ingress_ifindex` 0).
    static ARRIVES_ON: Cell<u32> = const { Cell::new(0) };
}

/// Numbers the namespaces of this process's rows.
static ROW_NETNS: AtomicU32 = AtomicU32::new(0);

/// A row's namespace, `svct<pid>x<n>-fx` (the harness's naming, so a run killed before its
/// guard ran is cleaned up by the next topology's stale-run sweep); deleted on drop.
struct RowNetns {
    netns: Netns,
}

impl RowNetns {
    fn build(uplink: &Uplink) -> anyhow::Result<Self> {
        let name = format!(
            "{TEST_PREFIX}{}x{}-fx",
            std::process::id(),
            1_000_000 + ROW_NETNS.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self {
            netns: Netns::named(&name),
        };
        if !uplink.sysctls.is_empty() {
            ns.netns.sysctl(uplink.sysctls)?;
        }
        ns.netns.ip_batch(uplink.ip)?;
        Ok(ns)
    }
}

impl Drop for RowNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", self.netns.name()]) {
            eprintln!("removing the row's namespace {}: {e:#}", self.netns);
        }
    }
}

/// `ip args...`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// [`run`] in the current namespace.
fn run_here(fixture: &Fixture, repeat: u32) -> anyhow::Result<Report> {
    let mut ebpf = loader::load_object_with(fixture.sizes, fixture.globals)?;
    // Programs first: loaded programs hold their maps, so a setup may take maps out (and run
    // other programs, e.g. an earlier packet). The XDP one only for its own rows: it is about
    // half of a row's time in the verifier.
    loader::load_programs(&mut ebpf, fixture.program == loader::PROG_XDP_FROM_WORLD)?;
    // As a started agent leaves it (`datapath::tc_clients`); a setup may undo it.
    set_tc_clients_ready(&mut ebpf, true)?;
    if let Some(setup) = fixture.setup {
        setup(&mut ebpf).context("row setup (writing its map entries)")?;
    }
    let before = read_counters(&ebpf)?;
    let drops_before = read_drops(&ebpf)?;
    let mut out = vec![0u8; fixture.input.len() + OUT_HEADROOM];
    let result = test_run(&mut ebpf, fixture.program, &fixture.input, &mut out, 1)?;
    out.truncate(result.0);
    let after = read_counters(&ebpf)?;
    let drops_after = read_drops(&ebpf)?;

    let mut problems = String::new();
    if result.1 != fixture.verdict.code() {
        let _ = writeln!(
            problems,
            "verdict: got {} want {} ({:?})",
            result.1,
            fixture.verdict.code(),
            fixture.verdict
        );
    }
    let want = match &fixture.output {
        Expected::Unchanged => &fixture.input,
        Expected::Packet(p) => p,
    };
    if out != *want {
        let diff_at = out
            .iter()
            .zip(want.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(out.len().min(want.len()));
        let _ = writeln!(problems, "output frame differs from byte {diff_at}");
        let _ = writeln!(problems, "  got  ({} bytes): {}", out.len(), describe(&out));
        let _ = writeln!(
            problems,
            "  want ({} bytes): {}",
            want.len(),
            describe(want)
        );
        let _ = writeln!(problems, "  got  hex: {}", hex(&out, diff_at));
        let _ = writeln!(problems, "  want hex: {}", hex(want, diff_at));
    }
    for c in PktCounter::ALL {
        let want = fixture
            .counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, n)| *n);
        let got = after[c as usize].packets - before[c as usize].packets;
        if got != want {
            let _ = writeln!(
                problems,
                "counter {}: moved by {got}, want {want}",
                c.name()
            );
        }
    }
    for r in DropReason::ALL {
        let want = fixture
            .drops
            .iter()
            .find(|(k, _)| *k == r)
            .map_or(0, |(_, n)| *n);
        let got = drops_after[r as usize].packets - drops_before[r as usize].packets;
        if got != want {
            let _ = writeln!(
                problems,
                "drop reason {}: moved by {got}, want {want}",
                r.name()
            );
        }
    }
    if let Some(check) = fixture.check
        && let Err(e) = check(&ebpf, fixture)
    {
        let _ = writeln!(problems, "check: {e:#}");
    }
    if !problems.is_empty() {
        bail!(
            "row `{}` failed:\n  input: {}\n{problems}",
            fixture.name,
            describe(&fixture.input)
        );
    }

    let per_packet = if repeat > 1 {
        Some(median_run(&mut ebpf, fixture, repeat)?)
    } else {
        None
    };
    Ok(Report { per_packet })
}

/// The median kernel-measured time of `repeat` single runs of the row's program, each on a
/// fresh copy of its input (or of its timed inputs).
fn median_run(ebpf: &mut Ebpf, fixture: &Fixture, repeat: u32) -> anyhow::Result<Duration> {
    let inputs: Vec<Vec<u8>> = match fixture.timed_inputs {
        Some(input) => (0..repeat).map(input).collect(),
        None => vec![fixture.input.clone()],
    };
    let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = vec![0u8; longest + OUT_HEADROOM];
    let mut samples = (0..repeat)
        .map(|n| {
            let input = &inputs[n as usize % inputs.len()];
            test_run_timed(ebpf, fixture.program, input, &mut out, 1)
        })
        .collect::<anyhow::Result<Vec<Duration>>>()?;
    samples.sort_unstable();
    Ok(samples[samples.len() / 2])
}

/// Runs `program` over `input` `repeat` times; returns (output length, return value).
fn test_run(
    ebpf: &mut Ebpf,
    program: &str,
    input: &[u8],
    out: &mut [u8],
    repeat: u32,
) -> anyhow::Result<(usize, u32)> {
    let r = raw_test_run(ebpf, program, input, out, repeat)?;
    Ok((r.data_size_out as usize, r.return_value))
}

fn test_run_timed(
    ebpf: &mut Ebpf,
    program: &str,
    input: &[u8],
    out: &mut [u8],
    repeat: u32,
) -> anyhow::Result<Duration> {
    Ok(raw_test_run(ebpf, program, input, out, repeat)?.duration)
}

fn raw_test_run(
    ebpf: &mut Ebpf,
    program: &str,
    input: &[u8],
    out: &mut [u8],
    repeat: u32,
) -> anyhow::Result<aya::programs::TestRunResult> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("no program `{program}` in the object"))?;
    // With an uplink: for TC, `struct __sk_buff` up to `ifindex`, with `ingress_ifindex`
    // (offset 36) and `ifindex` (40) naming it (the kernel takes a shorter context as
    // zero-filled); for XDP, `struct xdp_md`: no metadata (`data` 0), `data_end` the frame's
    // length, `ingress_ifindex` (offset 12) naming it.
    let arrives_on = ARRIVES_ON.get();
    let mut ctx = [0u8; 44];
    let ctx_len = if matches!(prog, Program::Xdp(_)) {
        let len = u32::try_from(input.len()).context("frame length")?;
        ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&arrives_on.to_ne_bytes());
        24
    } else {
        ctx[36..40].copy_from_slice(&arrives_on.to_ne_bytes());
        ctx[40..44].copy_from_slice(&arrives_on.to_ne_bytes());
        44
    };
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(out),
        ctx_in: (arrives_on != 0).then_some(&ctx[..ctx_len]),
        repeat,
        ..TestRunOptions::default()
    };
    let result = match prog {
        Program::SchedClassifier(p) => {
            if p.fd().is_err() {
                p.load()
                    .with_context(|| format!("loading `{program}` (verifier)"))?;
            }
            p.test_run(opts)
        }
        Program::Xdp(p) => {
            if p.fd().is_err() {
                p.load()
                    .with_context(|| format!("loading `{program}` (verifier)"))?;
            }
            p.test_run(opts)
        }
        other => bail!("program `{program}` has a type the runner does not drive: {other:?}"),
    };
    result.with_context(|| format!("BPF_PROG_TEST_RUN of `{program}`"))
}

/// Runs `program` once over `input` (for setups that need earlier packets, e.g. a request
/// before its reply). Returns the verdict and the output frame.
pub fn run_once(ebpf: &mut Ebpf, program: &str, input: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + OUT_HEADROOM];
    let (len, verdict) = test_run(ebpf, program, input, &mut out, 1)?;
    out.truncate(len);
    Ok((verdict, out))
}

/// Opens a map `program` uses, by its kernel name (which the kernel cuts to 15 bytes), even
/// when a setup took it out of the object.
pub fn program_map(ebpf: &Ebpf, program: &str, name: &str) -> anyhow::Result<aya::maps::MapData> {
    let prog = ebpf
        .program(program)
        .ok_or_else(|| anyhow!("no program `{program}`"))?;
    let info = match prog {
        Program::SchedClassifier(p) => p.info()?,
        Program::Xdp(p) => p.info()?,
        other => bail!("program `{program}` has a type the runner does not drive: {other:?}"),
    };
    let kernel_name = &name[..name.len().min(15)];
    for id in info.map_ids()?.unwrap_or_default() {
        let m = aya::maps::MapInfo::from_id(id)?;
        if m.name_as_str() == Some(kernel_name) {
            return Ok(aya::maps::MapData::from_id(id)?);
        }
    }
    bail!("program `{program}` uses no map named {name}")
}

/// Marks `TC_CLIENTS_V1` complete (`ready`), as the agent does once its programs are attached,
/// or not complete (an agent that has not filled it yet: every reply from a backend address is
/// looked up in conntrack).
pub fn set_tc_clients_ready(ebpf: &mut Ebpf, ready: bool) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut("TC_CLIENTS_READY_V1")
        .ok_or_else(|| anyhow!("no map TC_CLIENTS_READY_V1"))?;
    let mut array: Array<_, TcClientsReady> = Array::try_from(map)?;
    let value = TcClientsReady {
        ready: if ready { TC_CLIENTS_READY } else { 0 },
    };
    array.set(0, value, 0)?;
    Ok(())
}

/// Reads the drop counters, summed over CPUs, indexed by [`DropReason`].
pub fn read_drops(ebpf: &Ebpf) -> anyhow::Result<Vec<Counter>> {
    sum_per_cpu(ebpf, "DROP_STATS_V1", DropReason::COUNT)
}

/// Reads the parser counters, summed over CPUs, indexed by [`PktCounter`].
pub fn read_counters(ebpf: &Ebpf) -> anyhow::Result<Vec<Counter>> {
    sum_per_cpu(ebpf, "PKT_STATS_V1", PktCounter::COUNT)
}

fn sum_per_cpu(ebpf: &Ebpf, name: &str, n: u32) -> anyhow::Result<Vec<Counter>> {
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map(name).ok_or_else(|| anyhow!("no map {name}"))?)?;
    (0..n)
        .map(|i| {
            let per_cpu = map.get(&i, 0)?;
            Ok(per_cpu.iter().fold(Counter::default(), |acc, v| Counter {
                packets: acc.packets + v.packets,
                bytes: acc.bytes + v.bytes,
            }))
        })
        .collect()
}

/// Hex dump with the first differing byte bracketed.
fn hex(data: &[u8], mark: usize) -> String {
    data.iter()
        .enumerate()
        .map(|(i, b)| {
            if i == mark {
                format!("[{b:02x}]")
            } else {
                format!("{b:02x}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
