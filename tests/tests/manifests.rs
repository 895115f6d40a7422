//! The deployment manifests (`manifests/deploy`, `manifests/kind`) are real Kubernetes objects
//! that fit the agent: they parse as the API types, RBAC grants exactly what the agent uses,
//! and the `DaemonSet`'s arguments and environment are ones `svc-agent` accepts. Needs no root.

use std::{collections::BTreeSet, path::Path};

use clap::CommandFactory as _;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::ServiceAccount,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/deploy");
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
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true)
    );
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
    // The arguments parse (with the environment's node name standing in).
    let mut argv = vec!["svc-agent".to_owned()];
    argv.extend(container.args.clone().unwrap_or_default());
    argv.extend(["--node-name".to_owned(), "node1".to_owned()]);
    <svc_agent::cli::Cli as clap::Parser>::try_parse_from(&argv)
        .expect("the DaemonSet's arguments parse");
    // The bpffs is the host's, shared both ways, so pins outlive the pod.
    let mount = container
        .volume_mounts
        .as_ref()
        .and_then(|m| m.iter().find(|m| m.mount_path == "/sys/fs/bpf"))
        .expect("a /sys/fs/bpf mount");
    assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
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

#[test]
fn the_kind_cluster_has_no_kube_proxy() {
    let docs = documents(Path::new(KIND));
    assert_eq!(docs[0]["networking"]["kubeProxyMode"], "none");
}
