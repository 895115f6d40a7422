//! The agent's life on a node, end to end through the real binary on a real bpffs:
//!
//! - **One agent per node**: two agents started at the same instant on a fresh bpffs: one
//!   runs, the other exits 1 at once naming the first one's pid (before the lock one of them
//!   died of a pin race, or both ran); a third started later is refused the same way;
//!   `inspect` says an agent runs (and with which pid), `cleanup` refuses while it does and
//!   leaves every pin in place; once the agent stopped, `inspect` says none runs and a new agent
//!   starts.
//! - **Arguments checked first**: a missing `--from-dir`, an empty `--node-name`, a `--cgroup`
//!   that is no cgroup, `--socket-lb host-only` with `--cgroup ''`: each run exits non-zero with
//!   its own message and leaves the bpffs empty (before, a missing `--from-dir` was found after
//!   the maps and links were pinned).
//! - **Root-only pin directories**: `svc/` owned by another user, `svc/` writable by others,
//!   `svc/` a symbolic link, `svc/v1` owned by another user: each run is refused with a message
//!   saying why and pins nothing; a bpffs the agent mounts itself is mode 0700.
//!
//! - **Maps of another size**: an agent restarted with bigger `--max-service-entries` and
//!   `--max-conntrack-entries` migrates the pinned maps (before, it silently kept the old
//!   sizes): the maps have the new sizes, no old pin remains, 40 established connections keep
//!   answering from their backends, and Services that did not fit before are served; a
//!   restart asking for fewer `SERVICES_V1` entries than it holds is refused, pins unchanged.
//! - **The kernel half of a start on its own thread**: the maps are created and the programs
//!   loaded and attached while the source lists and computes; "svc-agent running" comes only
//!   after "programs attached", after the connect-time programs' attach line. A start whose maps
//!   cannot be adopted (asking for fewer `SERVICES_V1` entries than the stopped agent's map
//!   holds), following an API server that never answers (its first sync never comes), still
//!   exits 1 at once with the reason, and leaves the stopped agent's pins and links as they
//!   were: its programs go on translating.
//! - **A stop signal in the middle of a pass**: SIGTERM while the first pass writes 12,000
//!   Services ends the agent by itself within its 0.9 s grace (before, the pass ran to its end
//!   and the test's SIGKILL after 3 s ended it); the next agent completes the programming and
//!   stops gracefully.
//!
//! Needs root and a built agent (`cargo build -p svc-agent`): fails, never skips, without them.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use std::net::{IpAddr, SocketAddr};

use aya::maps::MapData;
use svc_tests::{
    k8s::{self, Agent, EndpointSlice, Protocol, Service, TcpSession},
    netns::{Node, Process},
    testbed::{TestBed, vip4},
};

/// How long a refused agent may take to exit (it must do so at once; this only bounds a hang).
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// An unprivileged uid (`nobody`).
const NOBODY: u32 = 65534;

/// `svc-agent --bpffs <bpffs> run ...` for `node`, following the test's manifests, as
/// [`Agent::start`] runs it; `extra` is appended (a later flag wins, a repeated one is refused
/// by clap, so tests pass only flags not given here).
fn agent_command(bed: &TestBed, node: &Node, bpffs: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(&bed.agent_bin);
    cmd.arg("--bpffs")
        .arg(bpffs)
        .args([
            "run",
            "--pod-ifaces",
            "svcpod*",
            "--socket-lb",
            k8s::socket_lb(),
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for (flag, value) in k8s::TEST_MAP_SIZES {
        if !extra.contains(&flag) {
            cmd.arg(flag).arg(value.to_string());
        }
    }
    if !extra.contains(&"--node-name") {
        cmd.args(["--node-name", &node.name]);
    }
    if !extra.contains(&"--from-dir") {
        cmd.arg("--from-dir").arg(bed.manifests.path());
    }
    if !extra.contains(&"--cgroup") {
        cmd.arg("--cgroup").arg(&node.cgroup);
    }
    cmd
}

/// Waits (bounded) for `process` to exit; its exit code and output.
fn wait_exit(mut process: Process, timeout: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + timeout;
    loop {
        match process.try_status() {
            Ok(Some(status)) => return (status.code(), process.output()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => panic!(
                "{} did not exit within {timeout:?}: {}",
                process.label(),
                process.output()
            ),
            Err(e) => panic!("waiting for {}: {e:#}", process.label()),
        }
    }
}

/// Runs `cmd` on `node` to its end and checks that it failed with `expect` in its output.
fn refused(node: &Node, cmd: &Command, expect: &str) -> String {
    let started = Instant::now();
    let process = node.spawn(cmd).expect("spawning svc-agent");
    let (code, out) = wait_exit(process, REFUSE_TIMEOUT);
    assert_eq!(code, Some(1), "svc-agent must exit 1: {out}");
    assert!(out.contains(expect), "expected {expect:?} in: {out}");
    println!(
        "refused in {:.0} ms: {}",
        started.elapsed().as_secs_f64() * 1e3,
        out.lines()
            .find(|l| l.starts_with("Error"))
            .unwrap_or_default()
    );
    out
}

/// Everything below `dir`, relative, sorted; at the top of a bpffs only what the agent may
/// have made (the kernel's own `maps.debug` and `progs.debug` are left out).
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            out.push(path.strip_prefix(base).unwrap_or(&path).to_owned());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.retain(|p| !p.to_string_lossy().ends_with(".debug"));
    out.sort();
    out
}

fn run_cli(bed: &TestBed, bpffs: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(&bed.agent_bin)
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running svc-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_agent_per_node_second_refused_at_once_inspect_and_cleanup_know() {
    let bed = TestBed::new(&[(0, "web")]);
    let node = bed.topo.node(0).clone();
    let bpffs = node.bpffs.clone();
    assert!(tree(&bpffs).is_empty(), "a fresh bpffs");

    // Two agents at the same instant on a fresh bpffs: exactly one runs.
    let cmd = agent_command(&bed, &node, &bpffs, &[]);
    let mut a = node.spawn(&cmd).expect("spawning the first agent");
    let mut b = node.spawn(&cmd).expect("spawning the second agent");
    let deadline = Instant::now() + k8s::AGENT_START_TIMEOUT;
    let (mut winner, loser) = loop {
        assert!(
            Instant::now() < deadline,
            "neither agent ran or exited:\n{}\n{}",
            a.output(),
            b.output()
        );
        if a.try_status().unwrap().is_some() {
            break (b, a);
        }
        if b.try_status().unwrap().is_some() {
            break (a, b);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let winner_pid = winner.pid();
    let (code, out) = wait_exit(loser, REFUSE_TIMEOUT);
    assert_eq!(code, Some(1), "the second agent must exit 1: {out}");
    assert!(
        out.contains(&format!(
            "another svc-agent (pid {winner_pid}) holds the lock"
        )),
        "the refusal names the running agent's pid {winner_pid}: {out}"
    );
    winner
        .wait_for_output("svc-agent running", k8s::AGENT_START_TIMEOUT)
        .expect("the first agent runs");
    bed.step(&format!(
        "two agents at once: pid {winner_pid} runs, the other exited 1"
    ));

    // A third one, started while the first runs: refused at once.
    let started = Instant::now();
    refused(
        &node,
        &cmd,
        &format!("another svc-agent (pid {winner_pid}) holds the lock"),
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "refused at once, not after loading: {:?}",
        started.elapsed()
    );

    // inspect says so (and works); cleanup refuses and removes nothing.
    let (code, stdout, stderr) = run_cli(&bed, &bpffs, &["inspect", "services"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("svc-agent running (pid {winner_pid}")),
        "{stderr}"
    );
    assert!(
        !stdout.contains("svc-agent running"),
        "stdout stays a table"
    );
    let pinned = tree(&bpffs);
    let (code, _, stderr) = run_cli(&bed, &bpffs, &["cleanup"]);
    assert_eq!(
        code,
        Some(1),
        "cleanup must refuse while an agent runs: {stderr}"
    );
    assert!(
        stderr.contains("cleanup refuses while an agent runs")
            && stderr.contains(&format!("pid {winner_pid}")),
        "{stderr}"
    );
    assert_eq!(tree(&bpffs), pinned, "cleanup removed nothing");
    bed.step("inspect names the running agent, cleanup refused and left every pin");

    // Once it stopped: none runs, a new agent starts, cleanup works.
    winner.stop().expect("stopping the agent");
    let (_, _, stderr) = run_cli(&bed, &bpffs, &["inspect", "stats"]);
    assert!(stderr.contains("no svc-agent running"), "{stderr}");
    let agent = Agent::start(&bed.agent_bin, &node, bed.manifests.path())
        .expect("an agent starts once the first stopped");
    agent.stop().expect("stopping the agent");
    let (code, _, stderr) = run_cli(&bed, &bpffs, &["cleanup"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(tree(&bpffs).is_empty(), "cleanup removed everything");
    bed.step("after the stop: inspect says none runs, a new agent ran, cleanup removed all");
}

#[test]
fn bad_arguments_and_unsafe_pin_directories_are_refused_before_anything_is_pinned() {
    let bed = TestBed::new(&[(0, "web")]);
    let node = bed.topo.node(0).clone();
    let bpffs = node.bpffs.clone();
    let missing = bed.topo.run_dir().join("no-such-manifests");
    let missing = missing.to_str().unwrap();
    let not_cgroup = bed.topo.run_dir().to_str().unwrap().to_owned();
    let cases: [(&[&str], String); 4] = [
        (
            &["--from-dir", missing],
            format!("--from-dir {missing}: cannot list that directory"),
        ),
        (
            &["--node-name", ""],
            "--node-name \"\": not a Kubernetes node name".to_owned(),
        ),
        (
            &["--cgroup", &not_cgroup],
            format!("{not_cgroup} is not a cgroup v2 directory"),
        ),
        (
            &["--cgroup", "", "--socket-lb", "host-only"],
            "--socket-lb host-only asks for connect-time translation".to_owned(),
        ),
    ];
    for (args, expect) in &cases {
        if args.contains(&"--socket-lb") {
            // `--socket-lb` is given by agent_command already: build this one by hand.
            let mut cmd = Command::new(&bed.agent_bin);
            cmd.arg("--bpffs")
                .arg(&bpffs)
                .args(["run", "--node-name", &node.name, "--from-dir"]);
            cmd.arg(bed.manifests.path()).args(*args);
            refused(&node, &cmd, expect);
        } else {
            refused(&node, &agent_command(&bed, &node, &bpffs, args), expect);
        }
        assert!(
            tree(&bpffs).is_empty(),
            "{args:?} left pins: {:?}",
            tree(&bpffs)
        );
    }
    bed.step("bad arguments: each refused with its message, nothing pinned");

    let cmd = agent_command(&bed, &node, &bpffs, &[]);
    let root = bpffs.join("svc");
    // Pre-created by another user (what `mkdir` by uid 65534 leaves).
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
    refused(&node, &cmd, "it is owned by uid 65534, not root");
    assert_eq!(tree(&bpffs), [PathBuf::from("svc")], "nothing pinned");
    // Root's, but anyone may write to it.
    std::os::unix::fs::chown(&root, Some(0), Some(0)).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        &node,
        &cmd,
        "its mode 0777 lets group or others write to it",
    );
    assert_eq!(tree(&bpffs), [PathBuf::from("svc")], "nothing pinned");
    fs::remove_dir(&root).unwrap();
    // Not a directory at all.
    std::os::unix::fs::symlink(bed.topo.run_dir(), &root).unwrap();
    refused(&node, &cmd, "it is not a directory");
    let (code, _, stderr) = run_cli(&bed, &bpffs, &["cleanup"]);
    assert_eq!(code, Some(0), "cleanup removes a non-directory: {stderr}");
    assert!(tree(&bpffs).is_empty());
    // The layout's directory pre-created by another user.
    fs::create_dir(&root).unwrap();
    fs::create_dir(root.join("v1")).unwrap();
    std::os::unix::fs::chown(root.join("v1"), Some(NOBODY), Some(NOBODY)).unwrap();
    refused(&node, &cmd, "it is owned by uid 65534, not root");
    assert_eq!(
        tree(&bpffs),
        [PathBuf::from("svc"), PathBuf::from("svc/v1")],
        "nothing pinned"
    );
    fs::remove_dir_all(&root).unwrap();
    bed.step("unsafe svc/ and svc/v1: each refused, nothing pinned");

    // A bpffs the agent mounts itself: only root may enter or write it.
    let own = bed.topo.run_dir().join("own-bpffs");
    fs::create_dir(&own).unwrap();
    let mut agent = node
        .spawn(&agent_command(&bed, &node, &own, &[]))
        .expect("spawning the agent");
    agent
        .wait_for_output("svc-agent running", k8s::AGENT_START_TIMEOUT)
        .expect("the agent runs on the bpffs it mounted");
    let mode = fs::metadata(&own).unwrap().mode() & 0o777;
    agent.stop().expect("stopping the agent");
    let (code, _, stderr) = run_cli(&bed, &own, &["cleanup"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        mode, 0o700,
        "the agent mounted its bpffs with mode {mode:o}"
    );
    bed.step("a bpffs the agent mounted is mode 0700");
}

/// Bound on every connect, read and write that is expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// `name` (TCP port 80 to 8080 of `pods`) at `vip4(host)`, with its IPv4 slice.
fn web_service(bed: &TestBed, name: &str, host: u32, pods: &[&str]) -> Vec<String> {
    let svc = Service::cluster_ip(name, &[vip4(host)]).port("http", Protocol::Tcp, 80, 8080);
    let slice = EndpointSlice::new(name, false)
        .ports_of(&svc, &[])
        .ready_pods(&bed.topo, pods.iter().map(|p| bed.pod(p)))
        .to_yaml();
    vec![svc.to_yaml(), slice]
}

/// `max_entries` of the map pinned as `name` in the node's layout directory.
fn pinned_size(bpffs: &Path, name: &str) -> u32 {
    let path = bpffs.join("svc/v1").join(name);
    MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map_or_else(|e| panic!("{}: {e}", path.display()), |i| i.max_entries())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: small maps, connections, restart with bigger maps, the same connections, more Services"
)]
fn a_restart_with_bigger_maps_migrates_them_and_keeps_connections() {
    const LONG: usize = 40;
    let bed = TestBed::new(&[(0, "client"), (0, "a"), (0, "b")]);
    let backends = k8s::Backends::new();
    for pod in ["a", "b"] {
        let p = bed.pod(pod);
        backends
            .serve(&p.ns, pod, SocketAddr::new(IpAddr::from(p.ipv4), 8080))
            .unwrap_or_else(|e| panic!("serving {pod}: {e:#}"));
    }
    bed.manifests
        .write(
            "services.yaml",
            &k8s::documents(&web_service(&bed, "web", 10, &["a", "b"])),
        )
        .unwrap();
    let node = bed.topo.node(0).clone();
    let bpffs = node.bpffs.clone();
    let small = [
        "--max-service-entries",
        "16",
        "--max-conntrack-entries",
        "1024",
    ];
    let mut agent = node
        .spawn(&agent_command(&bed, &node, &bpffs, &small))
        .expect("spawning the agent");
    agent
        .wait_for_output("svc-agent running", k8s::AGENT_START_TIMEOUT)
        .expect("the agent runs with small maps");
    assert_eq!(pinned_size(&bpffs, "SERVICES_V1"), 16);
    assert_eq!(pinned_size(&bpffs, "CT_V1"), 1024);

    // Long-lived connections through the VIP, each answered by its backend.
    let dst = SocketAddr::new(vip4(10), 80);
    let client = bed.pod("client").clone();
    let mut conns = client
        .ns
        .run(|| {
            (0..LONG)
                .map(|i| {
                    let port = 21_000 + u16::try_from(i).unwrap();
                    let mut s = TcpSession::connect_from(port, dst, IO_TIMEOUT)?;
                    let label = s.ask(&format!("open{i}"))?.label;
                    Ok((s, label))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .expect("opening long-lived connections");
    bed.step(&format!(
        "{LONG} connections open with SERVICES_V1 16, CT_V1 1024 entries"
    ));

    // Restart with the test's (bigger) sizes.
    agent.stop().expect("stopping the agent");
    let mut agent = node
        .spawn(&agent_command(&bed, &node, &bpffs, &[]))
        .expect("spawning the agent");
    agent
        .wait_for_output("svc-agent running", k8s::AGENT_START_TIMEOUT)
        .expect("the agent runs with bigger maps");
    let log = agent.output();
    assert!(
        log.contains("the pinned map's size differs from this agent's: migrating it")
            && log.contains("map=SERVICES_V1")
            && log.contains("map=CT_V1"),
        "the agent says it migrates: {log}"
    );
    let (services, ct) = k8s::TEST_MAP_SIZES
        .iter()
        .fold((0, 0), |(s, c), (flag, v)| match *flag {
            "--max-service-entries" => (*v, c),
            "--max-conntrack-entries" => (s, *v),
            _ => (s, c),
        });
    assert_eq!(pinned_size(&bpffs, "SERVICES_V1"), services);
    assert_eq!(pinned_size(&bpffs, "CT_V1"), ct);
    assert!(
        !tree(&bpffs)
            .iter()
            .any(|p| p.to_string_lossy().ends_with("-old")),
        "old pins removed: {:?}",
        tree(&bpffs)
    );
    bed.step(&format!(
        "restarted: SERVICES_V1 {services}, CT_V1 {ct} entries, migrated"
    ));

    // Every connection goes on with its backend.
    client
        .ns
        .run(|| {
            for (i, (s, label)) in conns.iter_mut().enumerate() {
                let answer = s.ask(&format!("again{i}"))?;
                anyhow::ensure!(
                    answer.label == *label && answer.from == dst,
                    "connection {i}: answered by {} from {}, was {label}",
                    answer.label,
                    answer.from
                );
            }
            Ok(())
        })
        .expect("established connections keep their backends");
    bed.step(&format!(
        "all {LONG} connections answered by their own backends"
    ));

    // The new capacity: 12 more Services (36 SERVICES_V1 entries) than 16 entries held.
    let mut docs = web_service(&bed, "web", 10, &["a", "b"]);
    for host in 20..32 {
        docs.extend(web_service(&bed, &format!("more{host}"), host, &["a", "b"]));
    }
    bed.manifests
        .write("services.yaml", &k8s::documents(&docs))
        .unwrap();
    agent
        .wait_for_output("services_written=", Duration::from_secs(10))
        .expect("a sync");
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = SocketAddr::new(vip4(31), 80);
    let answer = loop {
        let got = client.ns.run(|| k8s::tcp_request(last, "more", IO_TIMEOUT));
        match got {
            Ok(a) => break a,
            Err(e) if Instant::now() > deadline => {
                panic!("{last} not served: {e:#}\n{}", agent.output())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(answer.from, last);
    let (_, services_out, _) = run_cli(&bed, &bpffs, &["inspect", "services", "-o", "json"]);
    let programmed = k8s::Programmed::parse(&services_out);
    assert!(
        programmed
            .backends(&k8s::frontend_key(last, Protocol::Tcp))
            .is_some_and(|b| b.len() == 2),
        "{services_out}"
    );
    bed.step("12 more Services served with the new capacity");
    drop(conns);
    agent.stop().expect("stopping the agent");

    // Too small for what SERVICES_V1 holds (13 frontends, 39 entries): refused, nothing moved.
    let before = tree(&bpffs);
    refused(
        &node,
        &agent_command(&bed, &node, &bpffs, &["--max-service-entries", "8"]),
        "the pinned map SERVICES_V1 holds 39 entries, more than the 8 asked for now",
    );
    assert_eq!(tree(&bpffs), before, "a refused migration changes no pin");
    assert_eq!(pinned_size(&bpffs, "SERVICES_V1"), services);
    bed.step("a shrink below what SERVICES_V1 holds is refused, pins unchanged");
    drop(backends);
}

/// The order of `needles` in `log` (each one's first line): every one present, in that order.
fn assert_in_order(log: &str, needles: &[&str]) {
    let at: Vec<usize> = needles
        .iter()
        .map(|n| {
            log.find(n)
                .unwrap_or_else(|| panic!("no {n:?} in the log:\n{log}"))
        })
        .collect();
    assert!(
        at.is_sorted(),
        "expected {needles:?} in this order (at {at:?}):\n{log}"
    );
}

#[test]
fn a_start_failing_in_the_kernel_fails_at_once_and_leaves_the_running_datapath_alone() {
    let bed = TestBed::new(&[(0, "client"), (0, "a")]);
    let backends = k8s::Backends::new();
    let a = bed.pod("a");
    backends
        .serve(&a.ns, "a", SocketAddr::new(IpAddr::from(a.ipv4), 8080))
        .expect("serving a");
    bed.manifests
        .write(
            "services.yaml",
            &k8s::documents(&web_service(&bed, "web", 10, &["a"])),
        )
        .unwrap();
    let node = bed.topo.node(0).clone();
    let bpffs = node.bpffs.clone();
    let mut agent = node
        .spawn(&agent_command(&bed, &node, &bpffs, &[]))
        .expect("spawning the agent");
    agent
        .wait_for_output("svc-agent running", k8s::AGENT_START_TIMEOUT)
        .expect("the agent runs");
    // The programs are loaded and attached on a thread of their own; "running" waits for them.
    assert_in_order(
        &agent.output(),
        &[
            "maps ready",
            "programs loaded (verifier)",
            "attached connect-time translation",
            "programs attached",
            "svc-agent running",
        ],
    );
    let dst = SocketAddr::new(vip4(10), 80);
    let client = bed.pod("client").clone();
    let ask = || {
        client
            .ns
            .run(|| k8s::tcp_request(dst, "hello", IO_TIMEOUT))
            .map(|answer| (answer.label, answer.from))
    };
    assert_eq!(ask().expect("served"), ("a".to_owned(), dst));
    agent.stop().expect("stopping the agent");
    let pins = tree(&bpffs);
    let (_, links, _) = run_cli(&bed, &bpffs, &["inspect", "links"]);
    bed.step("running came after the attach; agent stopped, its datapath pinned");

    // An API server that never answers: nothing listens on its port.
    let kubeconfig = bed.topo.run_dir().join("kubeconfig-nowhere");
    fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: nowhere\n  cluster:\n    server: \
         http://127.0.0.1:1\ncontexts:\n- name: nowhere\n  context:\n    cluster: nowhere\n    \
         user: nowhere\ncurrent-context: nowhere\nusers:\n- name: nowhere\n  user: {}\n",
    )
    .unwrap();
    let mut cmd = Command::new(&bed.agent_bin);
    cmd.arg("--bpffs")
        .arg(&bpffs)
        .args([
            "run",
            "--pod-ifaces",
            "svcpod*",
            "--socket-lb",
            k8s::socket_lb(),
        ])
        .args(["--node-name", &node.name, "--cgroup"])
        .arg(&node.cgroup)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for (flag, value) in k8s::TEST_MAP_SIZES {
        if flag != "--max-service-entries" {
            cmd.arg(flag).arg(value.to_string());
        }
    }
    // SERVICES_V1 holds 2 entries (a frontend and its slot).
    cmd.args(["--max-service-entries", "1"]);
    let out = refused(
        &node,
        &cmd,
        "the pinned map SERVICES_V1 holds 2 entries, more than the 1 asked for now",
    );
    assert!(!out.contains("svc-agent running"), "{out}");
    assert!(!out.contains("programs attached"), "{out}");
    assert_eq!(tree(&bpffs), pins, "a failed start changes no pin");
    assert_eq!(
        run_cli(&bed, &bpffs, &["inspect", "links"]).1,
        links,
        "a failed start attaches nothing"
    );
    assert_eq!(
        ask().expect("still served"),
        ("a".to_owned(), dst),
        "the stopped agent's programs go on translating"
    );
    bed.step("a start refused on the loading thread, first sync never come: exit 1 at once, datapath untouched");
    drop(backends);
}

/// Services in the directory of the stop test: a cold pass over them takes seconds.
const MANY: u32 = 12_000;

#[test]
fn a_stop_signal_ends_the_agent_within_a_second_even_in_the_middle_of_a_pass() {
    let bed = TestBed::new(&[(0, "web")]);
    let node = bed.topo.node(0).clone();
    let bpffs = node.bpffs.clone();
    let mut docs = Vec::new();
    for i in 0..MANY {
        docs.extend(web_service(&bed, &format!("svc-{i}"), 1000 + i, &["web"]));
    }
    // Written directly: `ManifestDir::write`'s check would compute all of them per node.
    fs::write(
        bed.manifests.path().join("many.yaml"),
        k8s::documents(&docs),
    )
    .expect("writing the Services");
    let sizes = ["--max-service-entries", "65536", "--max-backends", "65536"];
    let cmd = agent_command(&bed, &node, &bpffs, &sizes);

    // Stopped while its first pass writes the maps.
    let mut agent = node.spawn(&cmd).expect("spawning the agent");
    agent
        .wait_for_output("pod-facing interfaces", k8s::AGENT_START_TIMEOUT)
        .expect("the agent starts");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !agent.output().contains("synced"),
        "the first pass ended before the signal: make the directory bigger\n{}",
        agent.output()
    );
    let signalled = Instant::now();
    let (status, out) = agent.stop_with_output().expect("stopping the agent");
    let took = signalled.elapsed();
    bed.step(&format!(
        "SIGTERM in the middle of a {MANY}-Service pass: exited {status} after {:.0} ms",
        took.as_secs_f64() * 1e3
    ));
    // `stop` sends SIGKILL after 3 s: a clean exit means the agent stopped by itself.
    assert!(
        status.success(),
        "the agent did not stop by itself: {status}\n{out}"
    );
    assert!(
        out.contains("exiting in the middle of it"),
        "the agent says it cut its pass short:\n{out}"
    );

    // The next agent completes what the first one began, and stops gracefully when idle.
    let mut next = node.spawn(&cmd).expect("spawning the next agent");
    next.wait_for_output("svc-agent running", Duration::from_mins(2))
        .expect("the next agent programs the directory");
    let vip = SocketAddr::new(vip4(1000 + MANY - 1), 80);
    let programmed = k8s::Programmed::parse(
        &k8s::agent_command(
            &bed.agent_bin,
            &bpffs,
            &["inspect", "services", "-o", "json"],
        )
        .expect("inspect services"),
    );
    assert!(
        programmed
            .backends(&k8s::frontend_key(vip, Protocol::Tcp))
            .is_some_and(|b| b.len() == 1),
        "the last Service is programmed after the restart"
    );
    let (status, out) = next.stop_with_output().expect("stopping the next agent");
    assert!(status.success(), "{status}\n{out}");
    assert!(!out.contains("exiting in the middle of it"), "{out}");
    bed.step("the next agent programmed every Service and stopped gracefully");
}
