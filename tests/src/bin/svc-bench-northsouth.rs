//! North-south in figures (a benchmark, not a test: it prints figures and asserts nothing but
//! that every request was answered; it stays out of CI).
//!
//! Two emulated nodes running `svc-agent` (node-facing programs on their uplinks), one nginx
//! (`nginx-light`, one worker, `return 200 "ok\n"`) in pod web-0 on node1 behind a `NodePort`
//! Service (port 30080), and `wrk` in the external client's namespace on the underlay. Three
//! targets, measured side by side in one run, repetitions interleaved:
//!
//! - **direct**: the pod's own address (the external client routes pod CIDRs via node1): plain
//!   kernel forwarding, the floor;
//! - **nodeport-local**: node1:30080, its endpoint on node1 (DNAT on the uplink's ingress,
//!   reverse on its egress; the client's address kept);
//! - **nodeport-remote**: node2:30080, the endpoint on node1: DNAT + SNAT on node2's uplink and
//!   the program's own forwarding (FIB lookup, redirect), replies back through node2.
//!
//! Each with keep-alive connections (`wrk -c 8`, requests per second) and with a new connection
//! per request (`Connection: close`: connections per second). Medians of `SVC_BENCH_REPS`
//! (default 3) runs of `SVC_BENCH_SECS` (default 4) seconds; ratios to **direct**.
//!
//! Run as root: `cargo build --release -p svc-agent && cargo run --release -p svc-tests --bin
//! svc-bench-northsouth` (or `cargo xtask bench`, which installs `nginx-light` and `wrk` first).
//!
//! The new-connection figures swing widely on a shared machine (`TIME_WAIT` reuse of the
//! client's ports, CPU contention): compare them within one run only. Through SNAT, each new
//! connection holds a port of the node's range (`--snat-port-range`, 4,536 ports by default)
//! per endpoint until its conntrack entry closes (10 s after the FINs) and the agent collects it
//! (every 10 s): sustained new connections to one endpoint through one node are bounded by
//! that, as masquerading kube-proxy is by conntrack's port reuse.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use svc_tests::{
    k8s::{self, Endpoint, EndpointSlice, Protocol, Service},
    testbed::{TestBed, vip4},
};

const NODE_PORT: u16 = 30080;
const BACKEND_PORT: u16 = 5000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// nginx's configuration: one worker, no logs, `ok` on every path.
fn nginx_conf(dir: &std::path::Path, listen: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
         fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
         keepalive_requests 1000000;\n  \
         server {{ listen {listen} reuseport backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    )
}

/// Requests per second `wrk` reached against `url` from inside `ns` (`close`: a new connection
/// per request).
fn wrk(ns: &svc_tests::netns::Netns, url: &str, secs: u64, close: bool) -> anyhow::Result<f64> {
    let mut args = vec![
        "wrk".to_owned(),
        "-t2".to_owned(),
        "-c8".to_owned(),
        format!("-d{secs}s"),
        "--timeout".to_owned(),
        "2s".to_owned(),
    ];
    if close {
        args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    args.push(url.to_owned());
    let out = ns.exec(&args).with_context(|| format!("wrk {url}"))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") && !close {
        bail!("wrk {url} saw errors:\n{out}");
    }
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))
}

/// The drop reasons with packets in `inspect stats`'s text, appended to `out`.
fn drop_reasons(stats: &str, out: &mut String) {
    let _ = writeln!(out, "node2 `inspect stats` drop reasons with packets:");
    for line in stats
        .lines()
        .skip_while(|l| !l.starts_with("DROP_REASON"))
        .skip(1)
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [name, packets, _] = fields.as_slice()
            && *packets != "0"
        {
            let _ = writeln!(out, "  {name} {packets}");
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let secs = env_u64("SVC_BENCH_SECS", 4);
    let reps = env_u64("SVC_BENCH_REPS", 3);
    let mut bed = TestBed::new(&[(0, "web-0")]);
    let web0 = bed.pod("web-0").clone();
    let dir = bed.topo.run_dir().join("nginx");
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        nginx_conf(&dir, &format!("{}:{BACKEND_PORT}", web0.ipv4)),
    )?;
    let mut nginx = Command::new("nginx");
    nginx.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
    let server = web0.spawn(&nginx).context("starting nginx in web-0")?;

    let service = Service::cluster_ip("web", &[vip4(160)])
        .port("http", Protocol::Tcp, 80, BACKEND_PORT)
        .node_port(NODE_PORT);
    let slice = EndpointSlice::new("web", false)
        .ports_of(&service, &[])
        .endpoint(Endpoint::ready(&bed.topo, &web0, false));
    bed.manifests.write(
        "web.yaml",
        &k8s::documents(&[service.to_yaml(), slice.to_yaml()]),
    )?;
    // Room for the closed connections of the new-connection runs (10 s each in CT_V1).
    bed.start_agents_sized(&[("--max-conntrack-entries", 2_000_000)]);
    let node = |i: usize| bed.topo.node(i).underlay_v4;
    let targets = [
        ("direct", format!("http://{}:{BACKEND_PORT}/", web0.ipv4)),
        ("nodeport-local", format!("http://{}:{NODE_PORT}/", node(0))),
        (
            "nodeport-remote",
            format!("http://{}:{NODE_PORT}/", node(1)),
        ),
    ];
    let external = bed.topo.external().ns.clone();
    // Wait until every target answers (the agents program within milliseconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, url) in &targets {
        while wrk(&external, url, 1, false).is_err() {
            if Instant::now() > deadline {
                bail!("{name} ({url}) never answered");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut results: BTreeMap<(&str, bool), Vec<f64>> = BTreeMap::new();
    for rep in 0..reps {
        for close in [false, true] {
            for (name, url) in &targets {
                let rate = wrk(&external, url, secs, close)?;
                results.entry((name, close)).or_default().push(rate);
                eprintln!("rep {rep} {name} close={close}: {rate:.0}/s");
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nnorth-south: external client -> nginx in web-0 (node1); wrk -t2 -c8, {secs} s, \
         median of {reps}\n"
    );
    let _ = writeln!(
        out,
        "| target | keep-alive req/s | ratio | new conn/s | ratio |\n|---|---|---|---|---|"
    );
    let base = |close| median(results[&("direct", close)].clone());
    for (name, _) in &targets {
        let ka = median(results[&(*name, false)].clone());
        let nc = median(results[&(*name, true)].clone());
        let _ = writeln!(
            out,
            "| {name} | {ka:.0} | {:.3} | {nc:.0} | {:.3} |",
            ka / base(false),
            nc / base(true)
        );
    }
    let stats = bed.stats(1);
    let _ = writeln!(
        out,
        "\nnode2 counters: ext_dnat {}, snat {}, rev_snat {}, ct_miss_midflow {}; drops {}",
        stats.get("ext_dnat").copied().unwrap_or_default(),
        stats.get("snat").copied().unwrap_or_default(),
        stats.get("rev_snat").copied().unwrap_or_default(),
        stats.get("ct_miss_midflow").copied().unwrap_or_default(),
        stats.get("dropped").copied().unwrap_or_default(),
    );
    drop_reasons(&bed.agent(1).inspect("stats").unwrap_or_default(), &mut out);
    print!("{out}");
    drop(server);
    bed.finish_allowing(&["nearly full"]);
    Ok(())
}
