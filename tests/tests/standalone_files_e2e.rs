//! The standalone source as an operator's directory treats it, end to end with the real agent:
//! a file rewritten slowly in place never programs half of it, a broken edit keeps the file's
//! last good content, and a directory replaced under the agent (`mv dir dir.old; mkdir dir`)
//! is followed. Needs root and a built agent (`cargo build -p svc-agent`): fails, never
//! skips, without them. Runs with `SVC_TEST_SOCKET_LB=all` and `=host-only` alike.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use svc_tests::{
    k8s::{self, Backends, EndpointSlice, Protocol, Service, frontend_key},
    testbed::{TestBed, vip4},
};

/// How long the agents may take to apply a change of the directory.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on every request expected to succeed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const FILE: &str = "web.yaml";

/// The Service and its slice with `pods` as ready endpoints, as one file's text.
fn web(bed: &TestBed, pods: &[&str]) -> String {
    let svc = Service::cluster_ip("web", &[vip4(40)]).port(
        "http",
        Protocol::Tcp,
        SERVICE_PORT,
        TARGET_PORT,
    );
    let slice = EndpointSlice::new("web", false)
        .ports_of(&svc, &[])
        .ready_pods(&bed.topo, pods.iter().map(|p| bed.pod(p)));
    k8s::documents(&[svc.to_yaml(), slice.to_yaml()])
}

/// What node `node` programs for the Service (`None`: no frontend).
fn programmed(bed: &TestBed, node: usize) -> Option<BTreeSet<String>> {
    let key = frontend_key(SocketAddr::new(vip4(40), SERVICE_PORT), Protocol::Tcp);
    bed.programmed(node).backends(&key)
}

/// The backends `pods` make (`inspect services` form).
fn expect(bed: &TestBed, pods: &[&str]) -> BTreeSet<String> {
    pods.iter()
        .map(|p| SocketAddr::new(bed.pod_ip(p, vip4(40)), TARGET_PORT).to_string())
        .collect()
}

/// Waits until every node programs `pods` for the Service.
fn wait_programmed(bed: &TestBed, pods: &[&str], what: &str) {
    let want = Some(expect(bed, pods));
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let now: Vec<_> = (0..bed.agents.len()).map(|n| programmed(bed, n)).collect();
        if now.iter().all(|p| *p == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: programmed {now:?}, want {want:?}\n{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request from the client pod through the VIP; the pod that answered.
fn ask(bed: &TestBed) -> String {
    let client = bed.pod("client");
    let dst = SocketAddr::new(vip4(40), SERVICE_PORT);
    let answer = client
        .ns
        .run(|| k8s::tcp_request(dst, "hello", IO_TIMEOUT))
        .unwrap_or_else(|e| panic!("request to {dst}: {e:#}\n{}", bed.diag()));
    assert_eq!(answer.from, dst, "answered from {}", answer.from);
    answer.label
}

#[test]
fn the_directory_is_followed_as_an_operator_edits_it() {
    let mut bed = TestBed::new(&[(0, "client"), (0, "web-0"), (1, "web-1"), (1, "web-2")]);
    let backends = Backends::new();
    for name in ["web-0", "web-1", "web-2"] {
        let pod = bed.pod(name);
        backends
            .serve(&pod.ns, name, SocketAddr::new(pod.ipv4.into(), TARGET_PORT))
            .unwrap_or_else(|e| panic!("serving on {name}: {e:#}"));
    }
    bed.manifests
        .write(FILE, &web(&bed, &["web-0", "web-1"]))
        .unwrap();
    bed.start_agents();
    wait_programmed(&bed, &["web-0", "web-1"], "start");
    let file = bed.manifests.path().join(FILE);

    bed.step("rewriting the file in place, slowly: the Service first, its slice 1.5 s later");
    let new = web(&bed, &["web-1", "web-2"]);
    // `documents` puts `---` before each document: the slice starts at the last one.
    let cut = new
        .rfind("---\n")
        .filter(|&c| c > 0)
        .expect("two documents");
    let mut writer = std::fs::File::create(&file).unwrap();
    writer.write_all(&new.as_bytes()[..cut]).unwrap();
    writer.flush().unwrap();
    let half_written = Instant::now();
    while half_written.elapsed() < Duration::from_millis(1500) {
        // The Service alone would have no endpoints (a reject); it must keep its old ones.
        for node in 0..bed.agents.len() {
            assert_eq!(
                programmed(&bed, node),
                Some(expect(&bed, &["web-0", "web-1"])),
                "node{node} programmed a half-written file\n{}",
                bed.diag()
            );
        }
        let server = ask(&bed);
        assert!(
            server == "web-0" || server == "web-1",
            "answered by {server}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.write_all(&new.as_bytes()[cut..]).unwrap();
    drop(writer);
    wait_programmed(
        &bed,
        &["web-1", "web-2"],
        "after the writer closed the file",
    );

    bed.step("a broken edit (a syntax error) keeps the file's last good content");
    let broken = new.replace("kind: EndpointSlice", "kind: [EndpointSlice");
    let tmp = bed.manifests.path().join(".broken.tmp");
    std::fs::write(&tmp, &broken).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let syncs: Vec<usize> = bed.agents.iter().map(k8s::Agent::syncs).collect();
    let deadline = Instant::now() + SYNC_TIMEOUT;
    while !bed
        .agents
        .iter()
        .all(|a| a.log().contains("keeps serving its last good version"))
    {
        assert!(
            Instant::now() < deadline,
            "no agent said it kept the file\n{}",
            bed.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_programmed(&bed, &["web-1", "web-2"], "after a broken edit");
    let after: Vec<usize> = bed.agents.iter().map(k8s::Agent::syncs).collect();
    assert_eq!(
        syncs, after,
        "a broken file that changes nothing is no pass"
    );

    bed.step("the directory replaced: mv dir dir.old; mkdir dir; files copied in, one edited");
    let dir = bed.manifests.path().to_owned();
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(&old).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    bed.manifests
        .write(FILE, &web(&bed, &["web-0", "web-2"]))
        .unwrap();
    wait_programmed(
        &bed,
        &["web-0", "web-2"],
        "after the directory was replaced",
    );
    bed.manifests.write(FILE, &web(&bed, &["web-0"])).unwrap();
    wait_programmed(&bed, &["web-0"], "an edit in the new directory");
    assert_eq!(ask(&bed), "web-0");
    std::fs::remove_dir_all(&old).unwrap();

    drop(backends);
    bed.finish_allowing(&["skipped a document", "keeps serving its last good version"]);
}
