//! The comparison, over desired states rendered as the reconciler renders them.

use std::fmt::Write as _;

use svc_common::addr::from_v4;

use super::*;

/// A directory of YAML, removed when dropped.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new(name: &str, files: &[(&str, String)]) -> Self {
        let dir = std::env::temp_dir().join(format!("svc-diff-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn svc(name: &str, ip: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {ip}\n\
         {extra}  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
    )
}

fn slice(name: &str, service: &str, ready: &[&str], terminating: &[&str]) -> String {
    let mut endpoints = String::new();
    for ip in ready {
        let _ = writeln!(
            endpoints,
            "- addresses: [\"{ip}\"]\n  nodeName: node1\n  conditions: {{ready: true}}"
        );
    }
    for ip in terminating {
        let _ = writeln!(
            endpoints,
            "- addresses: [\"{ip}\"]\n  nodeName: node2\n  conditions: {{ready: false, serving: \
             true, terminating: true}}"
        );
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n\
         {endpoints}ports:\n- {{name: http, port: 8080}}\n"
    )
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node1\n";

fn desired(dir: &Dir) -> Desired {
    let (state, notes) =
        desired_from_dir(&dir.0, "node1", NodePortAddresses::default(), vec![]).expect("reading");
    assert!(notes.is_empty(), "{notes:?}");
    desired_states(&state)
}

/// The maps a reconciler would write for `d`, id-free, and its backends by endpoint.
fn as_maps(d: &Desired) -> (BTreeMap<ServiceKey, FrontendState>, BTreeMap<String, u8>) {
    let mut backends = BTreeMap::new();
    for fe in d.frontends.values() {
        for (e, f) in &fe.slots {
            backends.insert(e.clone(), f.unwrap());
        }
    }
    for kept in d.kept.values() {
        backends.extend(kept.iter().map(|(e, f)| (e.clone(), *f)));
    }
    (d.frontends.clone(), backends)
}

fn two_services(name: &str) -> Dir {
    Dir::new(
        name,
        &[
            ("node.yaml", NODE.to_owned()),
            (
                "web.yaml",
                format!(
                    "{}---\n{}",
                    svc("web", "198.19.0.10", ""),
                    slice(
                        "web-1",
                        "web",
                        &["198.18.1.10", "198.18.1.11"],
                        &["198.18.2.12"]
                    )
                ),
            ),
            (
                "api.yaml",
                format!(
                    "{}---\n{}",
                    svc(
                        "api",
                        "198.19.0.11",
                        "  sessionAffinity: ClientIP\n  internalTrafficPolicy: Local\n"
                    ),
                    slice("api-1", "api", &["198.18.1.20"], &[])
                ),
            ),
        ],
    )
}

#[test]
fn the_objects_rendered_match_themselves() {
    let dir = two_services("match");
    let d = desired(&dir);
    assert_eq!(d.frontends.len(), 2);
    let web = d
        .frontends
        .values()
        .find(|f| f.name.as_ref().is_some_and(|(s, _)| s == "default/web"))
        .unwrap();
    assert_eq!(web.slots.len(), 2, "{web:?}");
    assert_eq!(
        d.kept.values().map(BTreeMap::len).sum::<usize>(),
        1,
        "the terminating one"
    );
    let (have, backends) = as_maps(&d);
    let rows = compare(&d, &have, &backends);
    assert!(rows.is_empty(), "{rows:#?}");
    let text = format_diff(&rows, &d, Format::Table).unwrap();
    assert_eq!(
        text,
        "no drift: the maps hold the 2 frontends the objects ask for\n"
    );
    assert_eq!(format_diff(&rows, &d, Format::Json).unwrap(), "[]\n");
}

#[test]
fn missing_extra_and_different_frontends_are_reported_per_service() {
    let dir = two_services("drift");
    let d = desired(&dir);
    let (mut have, mut backends) = as_maps(&d);
    let key = |ip: [u8; 4]| ServiceKey {
        addr: from_v4(ip),
        port: svc_common::Be16::from_host(80),
        slot: 0,
        proto: 6,
        family: 4,
        scope: 0,
        _pad: 0,
    };
    // api's frontend gone from the maps; web's slot names another endpoint and its affinity
    // differs; an extra frontend nobody asks for; web's terminating backend gone.
    have.remove(&key([198, 19, 0, 11]));
    let web = have.get_mut(&key([198, 19, 0, 10])).unwrap();
    web.slots.remove("198.18.1.11:8080");
    web.slots.insert("198.18.1.99:8080".to_owned(), Some(0));
    web.affinity_timeout = 60;
    web.slots.insert(
        "198.18.1.10:8080".to_owned(),
        Some(backend_flags::TERMINATING),
    );
    have.insert(
        key([198, 19, 0, 12]),
        FrontendState {
            flags: flags::REJECT_EMPTY,
            affinity_timeout: 0,
            slots: BTreeMap::new(),
            name: Some(("default/old".to_owned(), "http".to_owned())),
            entry: true,
            stray: Vec::new(),
        },
    );
    backends.remove("198.18.2.12:8080");
    let rows = compare(&d, &have, &backends);
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.name.as_deref().unwrap(), r.drift.as_str()))
        .collect();
    assert_eq!(
        summary,
        [("api", "missing"), ("old", "extra"), ("web", "different")]
    );
    assert_eq!(rows[0].missing_backends, ["198.18.1.20:8080"]);
    let web = &rows[2];
    assert_eq!(web.missing_backends, ["198.18.1.11:8080"]);
    assert_eq!(web.extra_backends, ["198.18.1.99:8080"]);
    assert_eq!(web.missing_kept, ["198.18.2.12:8080"]);
    let fields: Vec<(&str, &str, &str)> = web
        .fields
        .iter()
        .map(|f| (f.field.as_str(), f.want.as_str(), f.have.as_str()))
        .collect();
    assert_eq!(
        fields,
        [
            ("sessionAffinity", "None", "ClientIP/60s"),
            ("198.18.1.10:8080", "ready,local", "terminating,remote"),
        ]
    );
    let text = format_diff(&rows, &d, Format::Table).unwrap();
    assert!(
        text.ends_with("drift: 3 frontends of 3 Services\n"),
        "{text}"
    );
    assert!(
        text.contains("sessionAffinity: want None, have ClientIP/60s"),
        "{text}"
    );
    let back: Vec<DiffRow> =
        serde_json::from_str(&format_diff(&rows, &d, Format::Json).unwrap()).unwrap();
    assert_eq!(back, rows);
}

#[test]
fn a_directory_that_cannot_be_listed_is_an_error_and_bad_files_are_notes() {
    let e = desired_from_dir(
        Path::new("/nonexistent/svc-diff"),
        "node1",
        NodePortAddresses::default(),
        vec![],
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("cannot list that directory"),
        "{e:#}"
    );
    let dir = Dir::new("bad", &[("bad.yaml", "kind: [".to_owned())]);
    let (_, notes) =
        desired_from_dir(&dir.0, "node1", NodePortAddresses::default(), vec![]).unwrap();
    assert!(notes.iter().any(|n| n.contains("bad.yaml")), "{notes:?}");
    assert!(
        notes.iter().any(|n| n.contains("no Node named node1")),
        "{notes:?}"
    );
}

#[test]
fn slot_entries_no_frontend_counts_are_stray() {
    let k = ServiceKey {
        addr: from_v4([198, 19, 0, 10]),
        port: svc_common::Be16::from_host(80),
        slot: 0,
        proto: 6,
        family: 4,
        scope: 0,
        _pad: 0,
    };
    let v = |id, count| ServiceValue {
        id,
        count,
        ..ServiceValue::default()
    };
    // One slot counted, slot 2 past the count; another frontend's slot 1 without its slot 0.
    let other = ServiceKey {
        port: svc_common::Be16::from_host(81),
        ..k
    };
    let services = BTreeMap::from([
        (k, v(1, 1)),
        (ServiceKey { slot: 1, ..k }, v(7, 0)),
        (ServiceKey { slot: 2, ..k }, v(8, 0)),
        (ServiceKey { slot: 1, ..other }, v(7, 0)),
    ]);
    let states = frontend_states(&services, &BTreeMap::new(), &BTreeMap::new());
    assert_eq!(
        (states[&k].entry, states[&k].stray.as_slice()),
        (true, &[2][..])
    );
    assert_eq!(states[&k].slots.keys().collect::<Vec<_>>(), ["slot 1"]);
    assert_eq!(
        (states[&other].entry, states[&other].stray.as_slice()),
        (false, &[1][..])
    );
    let rows = compare(&Desired::default(), &states, &BTreeMap::new());
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.drift == "extra"));
    assert_eq!(rows[0].extra_backends, ["slot 1", "slot 2 (stray)"]);
    assert_eq!(rows[1].extra_backends, ["slot 1 (stray)"]);
}
