//! The deployment manifests (`manifests/deploy`, `manifests/kind`) are real Kubernetes objects
//! that fit the agent: every object of `manifests/deploy` and `manifests/demo` is its API type
//! with no field the type does not have (a misspelt field is named with its path), RBAC grants
//! exactly what the agent uses, the `DaemonSet` runs it with least privilege (the capabilities
//! `svc-agent/src/caps.rs` asks for, no more), and its arguments and environment are ones
//! `svc-agent` accepts. Needs no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use clap::CommandFactory as _;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde_json::Value;
use svc_agent::caps::{self, Cap};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/deploy");
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/demo");
const KIND: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/kind/kind-config.yaml"
);

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[Value], kind: &str) -> T {
    let matching: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(matching.len(), 1, "exactly one {kind}");
    serde_json::from_value(matching[0].clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// `typed` is `original` read into its API type and written back: every field of `original`
/// the type does not have is gone from it (`k8s-openapi`, as `serde`, skips unknown fields when
/// reading). Returns the path of each (`spec.template.spec.containers[0].securityContext.capabilites`).
fn dropped_fields(original: &Value, typed: &Value, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (key, value) in o {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match t.get(key) {
                    Some(kept) => out.extend(dropped_fields(value, kept, &here)),
                    // An explicit null is no field at all to the API server.
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (value, kept)) in o.iter().zip(t).enumerate() {
                out.extend(dropped_fields(value, kept, &format!("{path}[{i}]")));
            }
        }
        _ => {}
    }
    out
}

/// `doc` read into `T` and written back.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    doc: &Value,
) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// What is wrong with one object (a `v1` `List`'s items each on their own): it is of no
/// known type, does not parse as its type, or has fields its type does not (by path).
fn object_problems(doc: &Value, at: &str) -> Vec<String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let typed = match (api_version, kind) {
        ("v1", "List") => {
            let mut problems = Vec::new();
            for key in doc.as_object().into_iter().flat_map(|o| o.keys()) {
                if !["apiVersion", "kind", "metadata", "items"].contains(&key.as_str()) {
                    problems.push(format!("{at}: {key}: not a field of v1 List"));
                }
            }
            let Some(items) = doc["items"].as_array() else {
                return vec![format!("{at}: a List without items")];
            };
            for (i, item) in items.iter().enumerate() {
                problems.extend(object_problems(item, &format!("{at} items[{i}]")));
            }
            return problems;
        }
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "Node") => round_trip::<Node>(doc),
        ("v1", "Pod") => round_trip::<Pod>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("discovery.k8s.io/v1", "EndpointSlice") => round_trip::<EndpointSlice>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        _ => {
            return vec![format!(
                "{at}: {api_version:?} {kind:?} is no type this test knows (add it to \
                 object_problems)"
            )];
        }
    };
    match typed {
        Err(e) => vec![format!("{at}: not a valid {api_version} {kind}: {e}")],
        Ok(typed) => dropped_fields(doc, &typed, "")
            .into_iter()
            .map(|field| format!("{at}: {field}: not a field of {api_version} {kind}"))
            .collect(),
    }
}

/// The problems of every document of `text` (a YAML stream), each prefixed with `name`, the
/// document's index and its object's name.
fn text_problems(name: &str, text: &str) -> Vec<String> {
    let docs = match serde_saphyr::from_multiple::<Value>(text) {
        Ok(docs) => docs,
        Err(e) => return vec![format!("{name}: not YAML: {e}")],
    };
    let mut problems = Vec::new();
    for (i, doc) in docs.iter().enumerate().filter(|(_, d)| !d.is_null()) {
        let object = doc["metadata"]["name"].as_str().unwrap_or("?");
        problems.extend(object_problems(
            doc,
            &format!("{name} document {i} ({object})"),
        ));
    }
    problems
}

#[test]
fn every_manifest_is_its_api_type_with_no_unknown_field() {
    let mut problems = Vec::new();
    let mut files = 0;
    for dir in [DEPLOY, DEMO] {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).expect("readable");
            let name = path.strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/../"));
            problems.extend(text_problems(
                &name.unwrap_or(&path).display().to_string(),
                &text,
            ));
            files += 1;
        }
    }
    assert!(files >= 7, "only {files} manifest files found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_misspelt_field_is_found_and_named_by_its_path() {
    let bad = r#"
apiVersion: v1
kind: ServiceAccount
metadata:
  name: fine
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: svc-agent
  lables:
    app: svc-agent
spec:
  selector:
    matchLabels:
      app: svc-agent
  template:
    spec:
      containers:
        - name: svc-agent
          image: svc-agent:dev
          securityContext:
            capabilites:
              add: ["BPF"]
          volumeMounts:
            - name: bpffs
              mountPath: /sys/fs/bpf
              mountPropogation: HostToContainer
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata:
      name: web
    spec:
      clusterIP: 198.19.0.10
      port: 80
  - apiVersion: v1
    kind: Frobnicator
    metadata:
      name: what
"#;
    assert_eq!(
        text_problems("bad.yaml", bad),
        [
            "bad.yaml document 1 (svc-agent): metadata.lables: not a field of apps/v1 DaemonSet",
            "bad.yaml document 1 (svc-agent): spec.template.spec.containers[0].securityContext.\
             capabilites: not a field of apps/v1 DaemonSet",
            "bad.yaml document 1 (svc-agent): spec.template.spec.containers[0].volumeMounts[0].\
             mountPropogation: not a field of apps/v1 DaemonSet",
            "bad.yaml document 2 (?) items[0]: spec.port: not a field of v1 Service",
            "bad.yaml document 2 (?) items[1]: \"v1\" \"Frobnicator\" is no type this test \
             knows (add it to object_problems)",
        ]
    );
    // A field of the wrong type is no object of the type at all.
    let wrong = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: 80}\n";
    let problems = text_problems("wrong.yaml", wrong);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("wrong.yaml document 0 (web): not a valid v1 Service: "),
        "{problems:?}"
    );
}

#[test]
fn rbac_grants_exactly_what_the_agent_uses() {
    let docs = documents(&Path::new(DEPLOY).join("rbac.yaml"));
    let account: ServiceAccount = one(&docs, "ServiceAccount");
    let role: ClusterRole = one(&docs, "ClusterRole");
    let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
    let mut grants = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    grants.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    for resource in ["/services", "/nodes", "discovery.k8s.io/endpointslices"] {
        for verb in ["get", "list", "watch"] {
            want.insert(format!("{resource}:{verb}"));
        }
    }
    want.insert("events.k8s.io/events:create".to_owned());
    want.insert("events.k8s.io/events:patch".to_owned());
    assert_eq!(grants, want);
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.unwrap_or_default()
    );
    let subject = &binding.subjects.unwrap_or_default()[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
}

#[test]
fn the_daemonset_runs_the_agent_as_it_expects() {
    let docs = documents(&Path::new(DEPLOY).join("daemonset.yaml"));
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("svc-agent"));
    assert_eq!(pod.host_network, Some(true));
    let container = &pod.containers[0];
    // Every variable the DaemonSet sets is one the agent reads (clap `env`), and NODE_NAME
    // comes from the downward API.
    let cli = svc_agent::cli::Cli::command();
    let run = cli.find_subcommand("run").expect("run subcommand");
    let mut known: BTreeSet<String> = cli
        .get_arguments()
        .chain(run.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    // Read by kube's in-cluster configuration and by tracing.
    known.extend(
        [
            "KUBERNETES_SERVICE_HOST",
            "KUBERNETES_SERVICE_PORT",
            "RUST_LOG",
        ]
        .map(str::to_owned),
    );
    let env = container.env.clone().unwrap_or_default();
    for var in &env {
        assert!(
            known.contains(&var.name),
            "the agent does not read {}",
            var.name
        );
    }
    let node_name = env
        .iter()
        .find(|v| v.name == "NODE_NAME")
        .expect("NODE_NAME");
    let from = node_name
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref());
    assert_eq!(from.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
    // The arguments parse (with the environment's node name standing in), and so does every
    // value the environment gives: each as the flag the variable stands for.
    let mut argv = vec!["svc-agent".to_owned()];
    argv.extend(container.args.clone().unwrap_or_default());
    argv.extend(["--node-name".to_owned(), "node1".to_owned()]);
    <svc_agent::cli::Cli as clap::Parser>::try_parse_from(&argv)
        .expect("the DaemonSet's arguments parse");
    let flag_of: BTreeMap<String, String> = cli
        .get_arguments()
        .chain(run.get_arguments())
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let mut with_env = argv.clone();
    for var in &env {
        if let (Some(flag), Some(value)) = (flag_of.get(&var.name), &var.value) {
            with_env.extend([format!("--{flag}"), value.clone()]);
        }
    }
    <svc_agent::cli::Cli as clap::Parser>::try_parse_from(&with_env)
        .unwrap_or_else(|e| panic!("the DaemonSet's environment as flags {with_env:?}: {e}"));
    // Connected UDP sockets of ended backends are destroyed in every pod's network namespace:
    // found through the host's processes and the runtime's bind mounts.
    assert_eq!(pod.host_pid, Some(true));
    let netns = container
        .volume_mounts
        .as_ref()
        .and_then(|m| m.iter().find(|m| m.mount_path == "/run/netns"))
        .expect("a /run/netns mount");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    // The probes ask the agent's health endpoint where the agent serves it.
    let healthz = env
        .iter()
        .find(|v| v.name == "SVC_HEALTHZ_BIND_ADDRESS")
        .and_then(|v| v.value.clone())
        .expect("SVC_HEALTHZ_BIND_ADDRESS");
    argv.extend(["--healthz-bind-address".to_owned(), healthz]);
    let svc_agent::cli::Command::Run(run) =
        <svc_agent::cli::Cli as clap::Parser>::try_parse_from(&argv)
            .expect("the arguments parse")
            .command
    else {
        panic!("not run");
    };
    let port = run
        .healthz_addr()
        .expect("an address")
        .expect("served")
        .port();
    for (name, probe, path) in [
        ("startup", container.startup_probe.as_ref(), "/livez"),
        ("liveness", container.liveness_probe.as_ref(), "/livez"),
        ("readiness", container.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("a {name} probe over HTTP"));
        assert_eq!(get.path.as_deref(), Some(path), "{name} probe");
        assert_eq!(
            get.port,
            IntOrString::Int(i32::from(port)),
            "the {name} probe asks the port the agent serves"
        );
    }
}

/// The value of the `DaemonSet`'s variable `name`.
fn env_value(container: &k8s_openapi::api::core::v1::Container, name: &str) -> String {
    container
        .env
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .and_then(|v| v.value.clone())
        .unwrap_or_else(|| panic!("{name} is not set to a value"))
}

#[test]
fn the_daemonset_runs_the_agent_with_least_privilege() {
    let docs = documents(&Path::new(DEPLOY).join("daemonset.yaml"));
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let container = &pod.containers[0];
    let sc = container
        .security_context
        .as_ref()
        .expect("a securityContext");
    assert_ne!(sc.privileged, Some(true), "the agent is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // Exactly the capabilities the agent asks for, every other one dropped; and they are
    // enough for what the agent checks at start (svc-agent/src/caps.rs).
    let capabilities = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: Vec<Cap> = capabilities
        .add
        .iter()
        .flatten()
        .map(|name| Cap::from_name(name).unwrap_or_else(|| panic!("{name}: no capability")))
        .collect();
    assert_eq!(added, caps::GRANTED, "the capabilities caps.rs names");
    let mask = added.iter().fold(0, |m, c| m | c.bit());
    caps::check(mask, true).expect("the DaemonSet's capabilities are enough for svc-agent run");
    assert!(
        !added.contains(&Cap::SYS_RESOURCE),
        "SYS_RESOURCE: not needed"
    );
    // Kubernetes spells capabilities without CAP_ (`CAP_SYS_ADMIN` is a different name to
    // its validation, and runtimes add the prefix).
    assert!(
        capabilities
            .add
            .iter()
            .flatten()
            .all(|c| !c.starts_with("CAP_")),
        "{:?}",
        capabilities.add
    );
    let pod_sc = pod
        .security_context
        .as_ref()
        .expect("a pod securityContext");
    assert_eq!(
        pod_sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(
        pod_sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()),
        Some("Unconfined")
    );
    // A memory limit above what 100,000 Services take (maps 565 MiB at the default sizes,
    // heap peak 799 MiB; measured with svc-bench-sync, see the manifest's comment).
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("resource limits");
    assert_eq!(limits.get("memory"), Some(&Quantity("2Gi".to_owned())));
    // Host paths: exactly the bpffs, the cgroup v2 root, /proc/sys/net and /run/netns; each
    // mounted where the environment tells the agent to look.
    let host_paths: BTreeMap<&str, &str> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    assert_eq!(
        host_paths.values().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/proc/sys/net",
            "/run/netns"
        ])
    );
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mounted = |host: &str| {
        mounts
            .iter()
            .find(|m| host_paths.get(m.name.as_str()) == Some(&host))
            .unwrap_or_else(|| panic!("no mount of the host's {host}"))
    };
    let bpffs = mounted("/sys/fs/bpf");
    assert_eq!(bpffs.mount_path, env_value(container, "SVC_BPFFS"));
    // From the host only: a non-privileged container cannot propagate mounts back.
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let cgroup = mounted("/sys/fs/cgroup");
    assert_eq!(cgroup.mount_path, env_value(container, "SVC_CGROUP"));
    assert_eq!(cgroup.read_only, Some(true));
    assert_eq!(
        mounted("/proc/sys/net").mount_path,
        env_value(container, "SVC_PROC_SYS_NET")
    );
    assert_eq!(
        mounted("/run/netns").mount_propagation.as_deref(),
        Some("HostToContainer")
    );
}

#[test]
fn the_bpffs_is_mounted_by_a_privileged_init_step_when_the_host_has_none() {
    let docs = documents(&Path::new(DEPLOY).join("daemonset.yaml"));
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let bpffs = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("the agent's bpffs mount");
    // The one step that mounts the bpffs when the host has none: the one privileged part,
    // with the host's bpffs shared both ways so its mount reaches the host.
    let init = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1, "one init container");
    let mount_bpffs = &init[0];
    assert_eq!(mount_bpffs.name, "mount-bpffs");
    let script = mount_bpffs.args.as_deref().unwrap_or_default().join(" ");
    assert!(
        script.contains("/proc/self/mounts") && script.contains("mount -t bpf"),
        "{script}"
    );
    let init_mounts = mount_bpffs.volume_mounts.as_deref().unwrap_or_default();
    assert_eq!(init_mounts.len(), 1);
    assert_eq!(init_mounts[0].name, bpffs.name);
    assert_eq!(init_mounts[0].mount_path, "/sys/fs/bpf");
    assert_eq!(
        init_mounts[0].mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_eq!(
        mount_bpffs
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true),
        "Bidirectional propagation needs a privileged container"
    );
}

#[test]
fn the_kind_cluster_has_no_kube_proxy() {
    let docs = documents(Path::new(KIND));
    assert_eq!(docs[0]["networking"]["kubeProxyMode"], "none");
}

#[test]
fn the_kind_echo_pods_are_their_api_types_and_fit_the_load_generator() {
    let path = Path::new(KIND)
        .parent()
        .expect("manifests/kind")
        .join("echo.yaml");
    let text = std::fs::read_to_string(&path).expect("manifests/kind/echo.yaml");
    let problems = text_problems("manifests/kind/echo.yaml", &text);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let docs = documents(&path);
    let deployment: Deployment = one(&docs, "Deployment");
    let spec = deployment.spec.expect("a Deployment spec");
    // `cargo xtask kind bench` selects them by this label in this namespace, and needs
    // replicas + a rollout's surge + an HPA step of pods (3 + 1 + 2 by default).
    assert_eq!(deployment.metadata.namespace.as_deref(), Some("svc-bench"));
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    assert_eq!(labels.get("app").map(String::as_str), Some("svc-echo"));
    assert!(spec.replicas.unwrap_or(1) >= 6);
}
