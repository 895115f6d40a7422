//! The test API server against the real `kube` client: lists, gets, selectors, pagination,
//! and `kube::runtime::watcher` streams through dropped connections, compaction (`410`),
//! failing requests and an API server that goes away for a while. Needs no root.

use std::{
    collections::BTreeSet,
    future::Future,
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServiceSpec},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Resource, ResourceExt as _,
    api::{ListParams, VersionMatch, WatchEvent, WatchParams},
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use svc_tests::apiserver::{ApiServer, Kind, Options, RequestRecord};
use tokio::{sync::mpsc, task::JoinHandle};

/// The longest any single wait of these tests may take.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)], cluster_ip: &str) -> Service {
    Service {
        metadata: meta(Some(namespace), name, labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            type_: Some("ClusterIP".to_owned()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn node(name: &str, label: &str) -> Node {
    Node {
        metadata: meta(None, name, &[("svc.test/round", label)]),
        ..Node::default()
    }
}

fn slice(namespace: &str, name: &str, address: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            name,
            &[("kubernetes.io/service-name", "web")],
        ),
        address_type: "IPv4".to_owned(),
        endpoints: vec![Endpoint {
            addresses: vec![address.to_owned()],
            ..Endpoint::default()
        }],
        ports: None,
    }
}

/// The name of an object, with its namespace when it has one.
fn id<K: Resource>(object: &K) -> String {
    match &object.meta().namespace {
        Some(ns) => format!("{ns}/{}", object.name_any()),
        None => object.name_any(),
    }
}

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(elapsed) => panic!("{elapsed} ({WAIT:?}) waiting for {what}"),
    }
}

/// Waits (bounded) until `condition` holds.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A watcher under observation
// ---------------------------------------------------------------------------------------------

/// What a watcher yields, in a form tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String, String),
    Delete(String),
}

/// A `kube::runtime::watcher` stream with the default backoff, driven by a task of its own
/// (a watcher only makes requests while polled), its errors recorded.
struct Watch {
    events: mpsc::Receiver<Result<Seen, String>>,
    task: JoinHandle<()>,
    errors: Vec<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    fn new<K>(api: Api<K>, config: watcher::Config) -> Self
    where
        K: Resource + Clone + std::fmt::Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let (tx, events) = mpsc::channel(4096);
        let task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, config).default_backoff().boxed();
            while let Some(item) = stream.next().await {
                let item = item.as_ref().map(seen).map_err(ToString::to_string);
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Self {
            events,
            task,
            errors: Vec::new(),
        }
    }

    /// The next event, skipping (and recording) errors.
    async fn next(&mut self) -> Seen {
        bounded("a watcher event", async {
            loop {
                match self.events.recv().await {
                    Some(Ok(event)) => return event,
                    Some(Err(e)) => self.errors.push(e),
                    None => panic!("the watcher stream ended"),
                }
            }
        })
        .await
    }

    /// Consumes a whole (re)list, `Init` to `InitDone`, returning the objects listed.
    async fn relist(&mut self) -> BTreeSet<String> {
        assert_eq!(self.next().await, Seen::Init, "errors: {:?}", self.errors);
        let mut listed = BTreeSet::new();
        loop {
            match self.next().await {
                Seen::InitApply(name) => assert!(listed.insert(name), "listed twice"),
                Seen::InitDone => return listed,
                other => panic!("unexpected {other:?} during a relist"),
            }
        }
    }
}

fn seen<K: Resource>(event: &Event<K>) -> Seen {
    match event {
        Event::Init => Seen::Init,
        Event::InitApply(o) => Seen::InitApply(id(o)),
        Event::InitDone => Seen::InitDone,
        Event::Apply(o) => {
            Seen::Apply(id(o), o.meta().resource_version.clone().unwrap_or_default())
        }
        Event::Delete(o) => Seen::Delete(id(o)),
    }
}

fn applied(name: &str, object: &impl Resource) -> Seen {
    Seen::Apply(
        name.to_owned(),
        object.meta().resource_version.clone().unwrap_or_default(),
    )
}

/// The next event of a raw `Api::watch` stream (skipping bookmarks unless asked for them).
async fn next_raw<K>(
    stream: &mut BoxStream<'static, kube::Result<WatchEvent<K>>>,
    bookmarks: bool,
) -> Option<WatchEvent<K>> {
    bounded("a raw watch event", async {
        loop {
            match stream.try_next().await {
                Ok(Some(WatchEvent::Bookmark(_))) if !bookmarks => {}
                Ok(event) => return event,
                Err(e) => panic!("watch stream error: {e}"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_gets_have_the_real_shapes() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    let web = server.apply(&service("default", "web", &[("app", "web")], "198.19.0.10"))?;
    server.apply(&service("other", "db", &[("app", "db")], "198.19.0.11"))?;
    // The server sets the version, uid and creation time; an unchanged update is a no-op.
    let rv: u64 = web.resource_version().unwrap().parse()?;
    assert!(web.uid().is_some() && web.metadata.creation_timestamp.is_some());
    let again = server.apply(&service("default", "web", &[("app", "web")], "198.19.0.10"))?;
    assert_eq!(again.resource_version(), web.resource_version());
    assert_eq!(server.resource_version(), rv + 1);

    let all = Api::<Service>::all(client.clone());
    let list = bounded("list", all.list(&ListParams::default())).await?;
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    let names: Vec<String> = list.items.iter().map(id).collect();
    assert_eq!(names, ["default/web", "other/db"]);
    assert_eq!(list.items[0].uid(), web.uid());

    let other = Api::<Service>::namespaced(client.clone(), "other");
    let list = bounded("list", other.list(&ListParams::default())).await?;
    assert_eq!(list.items.iter().map(id).collect::<Vec<_>>(), ["other/db"]);
    let selected = bounded(
        "list",
        all.list(&ListParams::default().labels("app in (web,x)")),
    )
    .await?;
    assert_eq!(
        selected.items.iter().map(id).collect::<Vec<_>>(),
        ["default/web"]
    );
    let by_ip = ListParams::default().fields("spec.clusterIP=198.19.0.11");
    let selected = bounded("list", all.list(&by_ip)).await?;
    assert_eq!(
        selected.items.iter().map(id).collect::<Vec<_>>(),
        ["other/db"]
    );
    let bad = bounded(
        "list",
        all.list(&ListParams::default().fields("spec.ports=1")),
    )
    .await;
    assert!(
        matches!(bad, Err(kube::Error::Api(s)) if s.code == 400),
        "unsupported field"
    );

    let got = bounded("get", other.get("db")).await?;
    assert_eq!(got.spec.unwrap().cluster_ip.as_deref(), Some("198.19.0.11"));
    let missing = bounded("get", other.get("nope")).await;
    assert!(matches!(missing, Err(kube::Error::Api(s)) if s.code == 404 && s.reason == "NotFound"));

    // Nodes are cluster-scoped; one node by name, or by field selector.
    server.apply(&node("node-a", "1"))?;
    server.apply(&node("node-b", "1"))?;
    let nodes = Api::<Node>::all(client.clone());
    assert_eq!(
        bounded("get", nodes.get("node-b")).await?.name_any(),
        "node-b"
    );
    let one = bounded(
        "list",
        nodes.list(&ListParams::default().fields("metadata.name=node-a")),
    )
    .await?;
    assert_eq!(one.items.iter().map(id).collect::<Vec<_>>(), ["node-a"]);

    // YAML fixtures in `kubectl get -o yaml` shape; an old version stays readable exactly.
    let before = server.resource_version();
    server.apply_yaml(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\n\
         endpoints:\n- addresses:\n  - 198.18.0.5\n  conditions:\n    ready: true\nports:\n- port: 8080\n  \
         protocol: TCP\n",
    )?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default");
    let listed = bounded("list", slices.list(&ListParams::default())).await?;
    assert_eq!(listed.items[0].endpoints[0].addresses, ["198.18.0.5"]);
    let old = ListParams::default()
        .at(&before.to_string())
        .matching(VersionMatch::Exact);
    let listed = bounded("list", slices.list(&old)).await?;
    assert!(listed.items.is_empty());
    assert_eq!(listed.metadata.resource_version, Some(before.to_string()));
    assert_eq!(server.objects().len(), 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_adds_modifications_and_deletes() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    server.apply(&service("default", "old", &[("app", "old")], "198.19.0.9"))?;
    let mut all = Watch::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut labelled = Watch::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels("app=web"),
    );
    assert_eq!(
        all.relist().await,
        BTreeSet::from(["default/old".to_owned()])
    );
    assert_eq!(labelled.relist().await, BTreeSet::new());
    wait_until("two open watches", || server.open_watches() == 2).await;

    let web = server.apply(&service("default", "web", &[("app", "web")], "198.19.0.10"))?;
    assert_eq!(all.next().await, applied("default/web", &web));
    assert_eq!(labelled.next().await, applied("default/web", &web));
    let moved = server.apply(&service("default", "web", &[("app", "web")], "198.19.0.20"))?;
    assert_ne!(moved.resource_version(), web.resource_version());
    assert_eq!(all.next().await, applied("default/web", &moved));
    assert_eq!(labelled.next().await, applied("default/web", &moved));
    // Leaving the label selection is a delete for the selecting watcher only.
    let relabelled = server.apply(&service("default", "web", &[("app", "api")], "198.19.0.20"))?;
    assert_eq!(all.next().await, applied("default/web", &relabelled));
    assert_eq!(
        labelled.next().await,
        Seen::Delete("default/web".to_owned())
    );
    assert!(server.delete(Kind::Service, "default", "web").is_some());
    assert_eq!(all.next().await, Seen::Delete("default/web".to_owned()));
    assert!(
        all.errors.is_empty() && labelled.errors.is_empty(),
        "{:?}",
        all.errors
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_watcher_follows_one_node_by_field_selector() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    server.apply(&node("node-a", "1"))?;
    server.apply(&node("node-b", "1"))?;
    let config = watcher::Config::default().fields("metadata.name=node-a");
    let mut watch = Watch::new(Api::<Node>::all(client), config);
    assert_eq!(watch.relist().await, BTreeSet::from(["node-a".to_owned()]));
    wait_until("the watch", || server.open_watches() == 1).await;
    server.apply(&node("node-b", "2"))?;
    server.delete(Kind::Node, "", "node-b");
    let a2 = server.apply(&node("node-a", "2"))?;
    assert_eq!(watch.next().await, applied("node-a", &a2));
    server.delete(Kind::Node, "", "node-a");
    assert_eq!(watch.next().await, Seen::Delete("node-a".to_owned()));
    let watches: Vec<_> = server.requests().into_iter().filter(|r| r.watch).collect();
    assert!(
        watches
            .iter()
            .all(|r| r.param("fieldSelector").as_deref() == Some("metadata.name=node-a"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_watches_stream_events_bookmarks_and_410() -> anyhow::Result<()> {
    let options = Options {
        bookmark_interval: Some(Duration::from_millis(200)),
        ..Options::default()
    };
    let server = ApiServer::start_with(options).await?;
    let client = server.client()?;
    let api = Api::<Service>::all(client);
    server.apply(&service("default", "a", &[], "198.19.0.1"))?;
    let synced = server.resource_version().to_string();

    // From "0": the current objects as ADDED, then changes; bookmarks carry the version.
    let mut stream = bounded("watch", api.watch(&WatchParams::default(), "0"))
        .await?
        .boxed();
    let first = next_raw(&mut stream, false).await;
    assert!(matches!(first, Some(WatchEvent::Added(s)) if s.name_any() == "a"));
    let b = server.apply(&service("default", "b", &[], "198.19.0.2"))?;
    let second = next_raw(&mut stream, false).await;
    assert!(
        matches!(second, Some(WatchEvent::Added(s)) if s.resource_version() == b.resource_version())
    );
    let bookmark = next_raw(&mut stream, true).await;
    let Some(WatchEvent::Bookmark(bookmark)) = bookmark else {
        panic!("expected a bookmark, got {bookmark:?}");
    };
    assert_eq!(
        bookmark.metadata.resource_version,
        server.resource_version().to_string()
    );
    assert_eq!(
        (
            bookmark.types.api_version.as_str(),
            bookmark.types.kind.as_str()
        ),
        ("v1", "Service")
    );
    server.delete(Kind::Service, "default", "b");
    let third = next_raw(&mut stream, false).await;
    let Some(WatchEvent::Deleted(gone)) = third else {
        panic!("expected DELETED, got {third:?}")
    };
    assert_eq!(
        gone.resource_version(),
        Some(server.resource_version().to_string())
    );

    // From a version still in the history: exactly the changes after it.
    let params = WatchParams::default().disable_bookmarks();
    let mut replay = bounded("watch", api.watch(&params, &synced)).await?.boxed();
    let e1 = next_raw(&mut replay, false).await;
    let e2 = next_raw(&mut replay, false).await;
    assert!(matches!(e1, Some(WatchEvent::Added(s)) if s.name_any() == "b"));
    assert!(matches!(e2, Some(WatchEvent::Deleted(s)) if s.name_any() == "b"));

    // From a compacted version: HTTP 200 and an ERROR event with a 410 Expired Status.
    server.compact();
    let mut gone = bounded("watch", api.watch(&WatchParams::default(), &synced))
        .await?
        .boxed();
    let error = next_raw(&mut gone, false).await;
    let Some(WatchEvent::Error(status)) = error else {
        panic!("expected ERROR, got {error:?}")
    };
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert!(
        next_raw(&mut gone, true).await.is_none(),
        "the stream ends after 410"
    );
    let watch = server.requests().into_iter().rfind(|r| r.watch).unwrap();
    assert_eq!(watch.status, 200);

    // timeoutSeconds ends the stream cleanly.
    let started = Instant::now();
    let mut short = bounded("watch", api.watch(&WatchParams::default().timeout(1), "0"))
        .await?
        .boxed();
    while next_raw(&mut short, true).await.is_some() {}
    assert!(started.elapsed() >= Duration::from_millis(900));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_resume_without_losing_events() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    for name in ["a", "b", "c"] {
        server.apply(&service("default", name, &[], "198.19.0.1"))?;
    }
    let mut watch = Watch::new(Api::<Service>::all(client), watcher::Config::default());
    assert_eq!(watch.relist().await.len(), 3);
    wait_until("the watch", || server.open_watches() == 1).await;
    let lists_before = server.requests().iter().filter(|r| !r.watch).count();

    // Cut the watch, and fail the first attempt to watch again (500s are not retried by the
    // client itself), so the changes below happen while the watcher is away.
    server.fail_next_with(1, 500);
    server.drop_watches();
    wait_until("the watch to close", || server.open_watches() == 0).await;
    let rv_at_drop = server.resource_version();
    let d = server.apply(&service("default", "d", &[], "198.19.0.4"))?;
    let b = server.apply(&service("default", "b", &[], "198.19.0.5"))?;
    server.delete(Kind::Service, "default", "c");

    assert_eq!(watch.next().await, applied("default/d", &d));
    assert_eq!(watch.next().await, applied("default/b", &b));
    assert_eq!(watch.next().await, Seen::Delete("default/c".to_owned()));
    // It resumed from where it was (no relist), after the failed attempts.
    let requests = server.requests();
    assert_eq!(
        requests.iter().filter(|r| !r.watch).count(),
        lists_before,
        "no relist"
    );
    let rewatch = requests
        .iter()
        .rfind(|r| r.watch && r.status == 200)
        .unwrap();
    let from: u64 = rewatch.param("resourceVersion").unwrap().parse()?;
    assert!(
        from <= rv_at_drop,
        "resumed from {from}, the changes began after {rv_at_drop}"
    );
    assert_eq!(requests.iter().filter(|r| r.status == 500).count(), 1);
    // The injected 500 fails exactly one attempt. A client connection the server cut may also
    // fail one attempt at the transport (`SendRequest`) depending on timing; that is the
    // client's business and is retried like the 500.
    let injected = watch
        .errors
        .iter()
        .filter(|e| e.contains("failed to start watching") && e.contains("failure injected"));
    assert_eq!(injected.count(), 1, "{:?}", watch.errors);
    assert!(
        watch
            .errors
            .iter()
            .filter(|e| e.contains("failed to start watching"))
            .all(|e| e.contains("failure injected") || e.contains("SendRequest")),
        "{:?}",
        watch.errors
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_makes_the_watcher_relist() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    for name in ["a", "b", "c"] {
        server.apply(&service("default", name, &[], "198.19.0.1"))?;
    }
    let mut watch = Watch::new(Api::<Service>::all(client), watcher::Config::default());
    assert_eq!(watch.relist().await.len(), 3);
    wait_until("the watch", || server.open_watches() == 1).await;

    // The API server goes away; meanwhile b is deleted, d created, and the history compacted.
    server.pause().await;
    server.delete(Kind::Service, "default", "b");
    server.apply(&service("default", "d", &[], "198.19.0.4"))?;
    server.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume().await?;

    // Watching again from its old version gets 410 Expired; the relist shows the delete.
    let listed = watch.relist().await;
    let expected: BTreeSet<String> = ["default/a", "default/c", "default/d"]
        .map(str::to_owned)
        .into();
    assert_eq!(listed, expected);
    assert!(
        watch
            .errors
            .iter()
            .any(|e| e.contains("410") || e.contains("too old resource version")),
        "{:?}",
        watch.errors
    );
    let e = server.apply(&service("default", "e", &[], "198.19.0.5"))?;
    assert_eq!(watch.next().await, applied("default/e", &e));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_paginate_over_a_consistent_snapshot() -> anyhow::Result<()> {
    const SLICES: usize = 1203;
    let server = ApiServer::start().await?;
    let client = server.client()?;
    for i in 0..SLICES {
        let ns = ["default", "kube-system", "web"][i % 3];
        server.apply(&slice(ns, &format!("s-{i:04}"), "198.18.0.1"))?;
    }
    let api = Api::<EndpointSlice>::all(client.clone());
    let page = bounded("list", api.list(&ListParams::default().limit(500))).await?;
    assert_eq!(page.items.len(), 500);
    assert_eq!(page.metadata.remaining_item_count, Some(703));
    let snapshot = page.metadata.resource_version.clone();
    let mut seen: BTreeSet<String> = page.items.iter().map(id).collect();
    // Changes between pages do not show: every page is the first page's snapshot.
    let last = format!("web/s-{:04}", SLICES - 1);
    server.delete(Kind::EndpointSlice, "web", &format!("s-{:04}", SLICES - 1));
    server.apply(&slice("web", "zz-new", "198.18.0.2"))?;
    let mut token = page.metadata.continue_;
    let mut pages = 1;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = bounded(
            "list",
            api.list(&ListParams::default().limit(500).continue_token(&t)),
        )
        .await?;
        assert_eq!(page.metadata.resource_version, snapshot);
        for item in &page.items {
            assert!(seen.insert(id(item)), "{} twice", id(item));
        }
        token = page.metadata.continue_;
        pages += 1;
    }
    assert_eq!((pages, seen.len()), (3, SLICES));
    assert!(seen.contains(&last) && !seen.contains("web/zz-new"));

    // An expired continue token is an HTTP 410 Expired, as on the real server.
    let page = bounded("list", api.list(&ListParams::default().limit(500))).await?;
    server.apply(&slice("web", "zz-newer", "198.18.0.3"))?;
    server.compact();
    let t = page.metadata.continue_.unwrap();
    let expired = bounded(
        "list",
        api.list(&ListParams::default().limit(500).continue_token(&t)),
    )
    .await;
    assert!(matches!(expired, Err(kube::Error::Api(s)) if s.code == 410 && s.reason == "Expired"));

    // The watcher lists in pages of 500 (its default) and sees every object once.
    let before = server.requests().len();
    let mut watch = Watch::new(api, watcher::Config::default());
    assert_eq!(watch.relist().await.len(), SLICES + 1);
    let lists: Vec<_> = server.requests()[before..]
        .iter()
        .filter(|r| !r.watch)
        .cloned()
        .collect();
    assert_eq!(lists.len(), 3);
    assert!(
        lists
            .iter()
            .all(|r| r.param("limit").as_deref() == Some("500"))
    );
    assert_eq!(
        lists
            .iter()
            .filter(|r| r.param("continue").is_some())
            .count(),
        2
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_503_itself() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    server.apply(&node("node-a", "1"))?;
    server.fail_next(3);
    let list = bounded(
        "list",
        Api::<Node>::all(client).list(&ListParams::default()),
    )
    .await?;
    assert_eq!(list.items.len(), 1);
    let statuses: Vec<u16> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 503, 200]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_backs_off_on_503_and_recovers() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    // Without kube's own retry layer the watcher sees every 503 and backs off.
    let mut config = server.config()?;
    config.default_retry = false;
    let client = kube::Client::try_from(config)?;
    server.apply(&node("node-a", "1"))?;
    server.fail_next(3);
    let started = Instant::now();
    let mut watch = Watch::new(Api::<Node>::all(client), watcher::Config::default());
    // Init is announced before each list attempt; the failed ones end in an error.
    let mut inits = 0;
    let listed = loop {
        match watch.next().await {
            Seen::Init => inits += 1,
            Seen::InitApply(name) => break name,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((inits, listed.as_str()), (4, "node-a"));
    assert_eq!(watch.next().await, Seen::InitDone);
    assert_eq!(watch.errors.len(), 3, "{:?}", watch.errors);
    assert!(
        watch
            .errors
            .iter()
            .all(|e| e.contains("503") || e.contains("ServiceUnavailable"))
    );
    // The default backoff waits 0.8 s, 1.6 s, 3.2 s... (plus up to as much jitter), but
    // kube's watcher announces `Init` (an Ok item, which resets the backoff) before every
    // list attempt: failed lists are retried every 0.8 to 1.6 s, without growth.
    let lists = &server.requests()[..4];
    assert!(lists.iter().all(|r| !r.watch), "{lists:?}");
    let list_gaps = gaps(lists);
    let (least, most) = (Duration::from_millis(750), Duration::from_millis(1700));
    assert!(
        list_gaps.iter().all(|g| *g >= least && *g < most),
        "{list_gaps:?}"
    );
    wait_until("the watch", || server.open_watches() == 1).await;
    let b = server.apply(&node("node-b", "1"))?;
    assert_eq!(watch.next().await, applied("node-b", &b));

    // Failed attempts to watch again (no Ok in between) back off exponentially, and the
    // watcher resumes from its version without relisting.
    let before = server.requests().len();
    server.fail_next(2);
    server.drop_watches();
    wait_until("the watch to close", || server.open_watches() == 0).await;
    let c = server.apply(&node("node-c", "1"))?;
    assert_eq!(watch.next().await, applied("node-c", &c));
    let requests = &server.requests()[before..];
    assert!(requests.iter().all(|r| r.watch), "no relist: {requests:?}");
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    let gaps = gaps(requests);
    assert!(
        gaps[0] >= Duration::from_millis(750) && gaps[1] > gaps[0],
        "{gaps:?}"
    );
    assert!(started.elapsed() < 2 * WAIT);
    Ok(())
}

/// The time between consecutive requests.
fn gaps(requests: &[RequestRecord]) -> Vec<Duration> {
    requests.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_rides_out_an_api_server_pause() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    server.apply(&node("node-a", "1"))?;
    let mut watch = Watch::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    assert_eq!(watch.relist().await.len(), 1);
    wait_until("the watch", || server.open_watches() == 1).await;

    server.pause().await;
    assert_eq!(server.open_watches(), 0);
    let refused =
        tokio::time::timeout(WAIT, Api::<Node>::all(client).list(&ListParams::default())).await?;
    assert!(refused.is_err(), "nothing serves while paused");
    let a2 = server.apply(&node("node-a", "2"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.resume().await?;

    // Back on the same port: the watcher resumes from its version, no relist.
    assert_eq!(watch.next().await, applied("node-a", &a2));
    assert!(!watch.errors.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_work_too() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let client = server.client()?;
    server.apply(&node("node-a", "1"))?;
    server.apply(&node("node-b", "1"))?;
    let config = watcher::Config::default().streaming_lists();
    let mut watch = Watch::new(Api::<Node>::all(client), config);
    let expected: BTreeSet<String> = ["node-a", "node-b"].map(str::to_owned).into();
    assert_eq!(watch.relist().await, expected);
    let c = server.apply(&node("node-c", "1"))?;
    assert_eq!(watch.next().await, applied("node-c", &c));
    let first = &server.requests()[0];
    assert_eq!(first.param("sendInitialEvents").as_deref(), Some("true"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_stops_it() -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    let addr = server.addr();
    let client = server.client()?;
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await?;
    assert!(refused.is_err(), "the port is closed");
    let list =
        tokio::time::timeout(WAIT, Api::<Node>::all(client).list(&ListParams::default())).await?;
    assert!(list.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_created_then_patched_into_a_series() -> anyhow::Result<()> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};

    let server = ApiServer::start().await?;
    let svc = server.apply(&service("shop", "web", &[], "198.19.0.10"))?;
    let recorder = Recorder::new(
        server.client()?,
        Reporter {
            controller: "svc-agent".to_owned(),
            instance: Some("node1".to_owned()),
        },
    );
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "InvalidObject".to_owned(),
        note: Some("spec.ports[0].port: 70000 is out of range".to_owned()),
        action: "Program".to_owned(),
        secondary: None,
    };
    let reference = svc.object_ref(&());
    bounded("publishing", recorder.publish(&event, &reference)).await?;
    bounded("publishing again", recorder.publish(&event, &reference)).await?;
    let events: Vec<K8sEvent> = server.objects_of()?;
    assert_eq!(
        events.len(),
        1,
        "the second publish patches the first: {events:?}"
    );
    let stored = &events[0];
    assert_eq!(stored.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(stored.reason.as_deref(), Some("InvalidObject"));
    assert_eq!(stored.type_.as_deref(), Some("Warning"));
    let regarding = stored.regarding.as_ref().expect("regarding");
    assert_eq!(regarding.name.as_deref(), Some("web"));
    assert_eq!(regarding.uid, svc.metadata.uid);
    assert_eq!(stored.series.as_ref().map(|s| s.count), Some(2));
    // Only Events are writable.
    let services: Api<Service> = Api::namespaced(server.client()?, "shop");
    let denied = services
        .create(
            &kube::api::PostParams::default(),
            &service("shop", "x", &[], "198.19.0.11"),
        )
        .await;
    assert!(denied.is_err(), "creating a Service must be refused");
    Ok(())
}
