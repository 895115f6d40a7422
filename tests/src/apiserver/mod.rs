//! A Kubernetes API server for tests, on loopback, speaking the real list/watch protocol to
//! the real `kube` client.
//!
//! [`ApiServer`] holds real objects (`v1` `Service`, `discovery.k8s.io/v1` `EndpointSlice`,
//! `v1` `Node`, `events.k8s.io/v1` `Event`) as JSON and serves them the way the real API server does:
//!
//! - **Versions.** One global resource version that grows with every change, like etcd's
//!   revision; each stored object carries the version of its last change in
//!   `metadata.resourceVersion`, and the server sets `metadata.uid` and `creationTimestamp`.
//!   An update that changes nothing is a no-op that makes no event.
//! - **Lists** (`GET /api/v1/services`, `/api/v1/namespaces/NS/services`,
//!   `/apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices`, `/api/v1/nodes`): a
//!   `ServiceList` (etc.) whose `metadata.resourceVersion` is the version it shows; items
//!   without `apiVersion`/`kind`, as the real server sends them. `limit`/`continue` paginate
//!   over a consistent snapshot: every page shows the state at the first page's version, even
//!   if objects change in between, until that version is compacted away (`410 Expired`).
//!   `resourceVersion=0` serves the current state and ignores `limit` (the watch cache's
//!   behaviour); `resourceVersionMatch=Exact` serves an older version.
//! - **One object** (`GET /api/v1/nodes/NAME`, `.../namespaces/NS/services/NAME`): the object
//!   or a `404 NotFound` `Status`.
//! - **Selectors**: `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`, and the kind's own selectable
//!   fields; others get `400` like on the real server). In a watch, an object entering the
//!   selection is `ADDED` and one leaving it `DELETED`, like the watch cache makes them.
//! - **Watches** (`?watch=true&resourceVersion=N`): a chunked response of one JSON event per
//!   line, `{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR","object":{...}}`, starting
//!   with every change after `N` from the bounded history. An `N` older than the history gets
//!   what the real server sends: HTTP 200 and one `ERROR` event holding a `Status` with code
//!   410, reason `Expired` (an expired `continue` token of a list gets an HTTP `410` instead,
//!   also like the real server). No `N` (or `0`) starts with synthetic `ADDED` events for the
//!   current objects (and, with `sendInitialEvents=true`, a bookmark annotated
//!   `k8s.io/initial-events-end`, so kube's streaming lists work too). `allowWatchBookmarks`
//!   brings a `BOOKMARK` every [`Options::bookmark_interval`]; `timeoutSeconds` ends the
//!   stream cleanly.
//!
//! - **Events** (`events.k8s.io/v1`): the one kind clients may write: `POST` creates one
//!   (`409 AlreadyExists` for a taken name), `PATCH` applies a JSON merge patch, as `kube`'s
//!   event `Recorder` does; every other write gets `405`, since the agent must never write
//!   anything else.
//! - **Controller writes**, only on a server started with [`Options::writable`] (a load
//!   generator's, never the agent's): `POST`, `PUT` (with `resourceVersion` preconditions) and
//!   `DELETE` of Services and `EndpointSlices`, answered like the real server answers them.
//!
//! Fault injection: [`ApiServer::drop_watches`] aborts every open watch mid-stream,
//! [`ApiServer::fail_next`] fails the next requests with `503` (or any code with
//! [`ApiServer::fail_next_with`]), [`ApiServer::compact`] forgets the history,
//! [`ApiServer::pause`] and [`ApiServer::resume`] take the server off its port and back.
//! [`ApiServer::requests`] shows what clients asked.
//!
//! Everything is bounded (history, objects, open watches and connections, watch duration,
//! the request log), and the server stops when the [`ApiServer`] is dropped. Built on hyper 1:
//! the same HTTP stack `kube`'s client already compiles, so it costs only hyper's server half.

mod http;
mod kind;
mod selector;
mod store;

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};

pub use self::kind::Kind;
use self::store::{Key, Store};
use crate::netns::Netns;

/// How many requests [`ApiServer::requests`] remembers.
const REQUEST_LOG: usize = 4096;

/// How many connections the server keeps open at once (more wait in the listen queue).
const MAX_CONNECTIONS: usize = 256;

/// Limits and timings of an [`ApiServer`].
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one (`None`: never). The real
    /// server sends one about every minute; tests want them sooner.
    pub bookmark_interval: Option<Duration>,
    /// How many changes the history keeps; a watch from before them gets `410 Expired`
    /// (the real server's watch cache keeps a few minutes' worth).
    pub history_limit: usize,
    /// How many objects the server holds at most.
    pub max_objects: usize,
    /// How many watches may be open at once (more get `429`).
    pub max_watches: usize,
    /// The longest a watch stays open (also when `timeoutSeconds` asks for longer).
    pub max_watch_duration: Duration,
    /// Whether clients may also create (`POST`), replace (`PUT`) and delete (`DELETE`)
    /// Services and `EndpointSlices`, as controllers and a load generator do
    /// (`svc_tests::loadgen`). Off by default: the agent must never write them, and a server
    /// that refuses proves it does not.
    pub writable: bool,
}

impl Default for Options {
    #[expect(
        clippy::duration_suboptimal_units,
        reason = "Duration::from_mins needs Rust 1.91; the workspace supports 1.89"
    )]
    fn default() -> Self {
        Self {
            bookmark_interval: Some(Duration::from_secs(1)),
            history_limit: 10_000,
            max_objects: 100_000,
            max_watches: 128,
            max_watch_duration: Duration::from_secs(30 * 60),
            writable: false,
        }
    }
}

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// When it was answered (for a watch: when the stream started).
    pub at: Instant,
    /// `GET`, ...
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The raw query string.
    pub query: String,
    /// Whether it was a watch (`watch=true`).
    pub watch: bool,
    /// The HTTP status of the answer.
    pub status: u16,
}

impl RequestRecord {
    /// A decoded query parameter.
    #[must_use]
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (http::percent_decode(k) == name).then(|| http::percent_decode(v))
        })
    }
}

/// What the server task and the test share.
#[derive(Debug)]
struct Shared {
    options: Options,
    store: Mutex<Store>,
    /// The current resource version, for open watches to wait on.
    rv_tx: watch::Sender<u64>,
    /// Bumped by [`ApiServer::drop_watches`].
    drop_tx: watch::Sender<u64>,
    /// How many of the next requests fail, and with which HTTP status.
    failures: Mutex<(u32, u16)>,
    open_watches: AtomicUsize,
    requests: Mutex<VecDeque<RequestRecord>>,
    served: AtomicU32,
}

impl Shared {
    fn new(options: Options) -> Self {
        let store = Store::new(options.history_limit, options.max_objects);
        let (rv_tx, _) = watch::channel(store.rv());
        let (drop_tx, _) = watch::channel(0);
        Self {
            options,
            store: Mutex::new(store),
            rv_tx,
            drop_tx,
            failures: Mutex::new((0, 503)),
            open_watches: AtomicUsize::new(0),
            requests: Mutex::new(VecDeque::new()),
            served: AtomicU32::new(0),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one injected failure, if any is left.
    fn take_failure(&self) -> Option<u16> {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let (left, code) = *failures;
        (left > 0).then(|| {
            failures.0 = left - 1;
            code
        })
    }

    fn record(&self, request: RequestRecord) {
        self.served.fetch_add(1, Ordering::Relaxed);
        let mut log = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == REQUEST_LOG {
            log.pop_front();
        }
        log.push_back(request);
    }

    /// Runs a change on the store and wakes the open watches.
    fn change<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store();
        let result = f(&mut store);
        let rv = store.rv();
        drop(store);
        self.rv_tx.send_replace(rv);
        result
    }
}

/// The serving task and how to stop it.
#[derive(Debug)]
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A Kubernetes API server on `127.0.0.1`, for tests (see the [module docs](self)).
///
/// Must be created and used inside a Tokio runtime; stops serving when dropped.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The network namespace it listens in (`None`: the test's own).
    netns: Option<Netns>,
    serving: Mutex<Option<Serving>>,
}

impl ApiServer {
    /// Starts a server with default [`Options`] on a free port of `127.0.0.1`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts a server with these options on a free port of `127.0.0.1`.
    pub async fn start_with(options: Options) -> anyhow::Result<Self> {
        Self::start_at(None, (Ipv4Addr::LOCALHOST, 0).into(), options).await
    }

    /// Starts a server listening on `addr` (port 0: a free one) inside the network namespace
    /// `netns`, e.g. on a node's underlay address so agents on every node reach it.
    pub async fn start_in(
        netns: &Netns,
        addr: SocketAddr,
        options: Options,
    ) -> anyhow::Result<Self> {
        Self::start_at(Some(netns.clone()), addr, options).await
    }

    #[expect(
        clippy::unused_async,
        reason = "the listener registers with the Tokio reactor: callers must be in a runtime"
    )]
    async fn start_at(
        netns: Option<Netns>,
        addr: SocketAddr,
        options: Options,
    ) -> anyhow::Result<Self> {
        let listener = bind(netns.as_ref(), addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(options));
        let serving = spawn_serving(listener, Arc::clone(&shared));
        Ok(Self {
            shared,
            addr,
            netns,
            serving: Mutex::new(Some(serving)),
        })
    }

    /// The address it serves on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for it: no TLS, no authentication, namespace `default`, and
    /// otherwise `kube`'s defaults (including its retry of `429`/`503`/`504` responses).
    pub fn config(&self) -> anyhow::Result<kube::Config> {
        let url = self.url().parse().context("test API server URL")?;
        Ok(kube::Config::new(url))
    }

    /// Writes a kubeconfig file for it (no TLS, no credentials, namespace `default`), for an
    /// agent started with `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    \
             namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// A `kube` client for it (see [`config`](Self::config)).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.config()?).context("building a kube client")
    }

    /// Creates or updates an object, returning it as stored (with `resourceVersion`, `uid`
    /// and `creationTimestamp`); open watches see `ADDED` or `MODIFIED` (nothing when it
    /// did not change). A namespaced object naming no namespace goes to `default`.
    pub fn apply<K>(&self, object: &K) -> anyhow::Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let mut value = serde_json::to_value(object)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".to_owned(), K::API_VERSION.into());
            map.insert("kind".to_owned(), K::KIND.into());
        }
        let stored = self.apply_json(value)?;
        serde_json::from_value(stored).context("reading back the stored object")
    }

    /// [`apply`](Self::apply) for an object given as JSON (with `apiVersion` and `kind`).
    pub fn apply_json(&self, object: Value) -> anyhow::Result<Value> {
        let stored = self
            .shared
            .change(|store| store.apply(object))
            .map_err(|e| anyhow!("apply: {e}"))?;
        Ok(stored.value.clone())
    }

    /// [`apply`](Self::apply) for every document of a YAML stream (`kubectl get -o yaml`
    /// shapes, `---` between documents), in order.
    pub fn apply_yaml(&self, text: &str) -> anyhow::Result<Vec<Value>> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(text).context("parsing YAML objects")?;
        documents
            .into_iter()
            .filter(|d| !d.is_null())
            .map(|d| self.apply_json(d))
            .collect()
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds), returning its
    /// last state if it existed; open watches see `DELETED`.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        };
        let last = self.shared.change(|store| store.delete(&key))?;
        Some(last.value.clone())
    }

    /// Every stored object (with `apiVersion` and `kind`), by kind, namespace and name.
    #[must_use]
    pub fn objects(&self) -> Vec<Value> {
        let store = self.shared.store();
        store.objects().values().map(|o| o.value.clone()).collect()
    }

    /// The stored objects of one type.
    pub fn objects_of<K>(&self) -> anyhow::Result<Vec<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let kind = Kind::of_resource::<K>()
            .ok_or_else(|| anyhow!("the test API server does not serve {}", K::KIND))?;
        let store = self.shared.store();
        store
            .objects()
            .iter()
            .filter(|(key, _)| key.kind == kind)
            .map(|(_, o)| serde_json::from_slice(&o.json).map_err(Into::into))
            .collect()
    }

    /// The current resource version.
    #[must_use]
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Forgets the change history (an etcd compaction at the current version): a watch
    /// or a list `continue` from any older version gets `410 Expired` and must relist.
    pub fn compact(&self) {
        self.shared.change(Store::compact);
    }

    /// Like [`compact`](Self::compact), one version later than any client has seen (the
    /// version moves on without an object changing, as other kinds' writes move etcd's
    /// revision): every watch, even one up to date through a bookmark, gets `410 Expired` and
    /// relists; a list then starts from the new version.
    pub fn compact_past_everyone(&self) {
        self.shared.change(Store::compact_past_everyone);
    }

    /// Aborts every open watch mid-stream (the connection closes without the final chunk).
    pub fn drop_watches(&self) {
        self.shared
            .drop_tx
            .send_modify(|generation| *generation += 1);
    }

    /// How many watches are open now.
    #[must_use]
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Fails the next `count` requests (of any kind) with `503 ServiceUnavailable`,
    /// replacing any injected failures still pending. Note that `kube`'s client retries
    /// `429`/`503`/`504` itself (up to 15 times, from 5 ms) unless its config sets
    /// `default_retry = false`; `500` reaches the caller at once.
    pub fn fail_next(&self, count: u32) {
        self.fail_next_with(count, 503);
    }

    /// Fails the next `count` requests with the HTTP status `code` (and a `Status` body),
    /// replacing any injected failures still pending.
    pub fn fail_next_with(&self, count: u32, code: u16) {
        *self
            .shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (count, code);
    }

    /// The last requests answered (at most 4096), oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<RequestRecord> {
        let log = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        log.iter().cloned().collect()
    }

    /// How many requests were answered in all.
    #[must_use]
    pub fn request_count(&self) -> u32 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Stops serving: closes the port and every connection (open watches end abruptly),
    /// until [`resume`](Self::resume). Objects can still be changed meanwhile.
    pub async fn pause(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Serving { stop, task }) = serving {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Serves again on the same port after [`pause`](Self::pause).
    #[expect(
        clippy::unused_async,
        reason = "the listener registers with the Tokio reactor: callers must be in a runtime"
    )]
    pub async fn resume(&self) -> anyhow::Result<()> {
        if self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Ok(());
        }
        let listener = bind(self.netns.as_ref(), self.addr)
            .with_context(|| format!("binding the test API server to {} again", self.addr))?;
        let serving = spawn_serving(listener, Arc::clone(&self.shared));
        let mut slot = self.serving.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            serving.task.abort();
            bail!("resume raced with another resume");
        }
        *slot = Some(serving);
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let serving = self
            .serving
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(serving) = serving {
            // Aborting drops the listener and the set of connections, which aborts them too.
            serving.task.abort();
        }
    }
}

/// A listener on `addr`, opened inside `netns` when given (it stays there).
fn bind(netns: Option<&Netns>, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let open = move || -> anyhow::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the test API server to {addr}"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    let listener = match netns {
        Some(ns) => ns.run(open)?,
        None => open()?,
    };
    TcpListener::from_std(listener).context("registering the API server's listener")
}

fn spawn_serving(listener: TcpListener, shared: Arc<Shared>) -> Serving {
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(listener, shared, stopped));
    Serving { stop, task }
}

/// Accepts connections until told to stop, then closes the port and every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors or similar: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(http::handle(&shared, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// A test API server as the end-to-end tests run it: in node1's namespace on its underlay
/// address (every node's agent reaches it), every node's Node stored, a kubeconfig for it in
/// the run directory, and the Tokio runtime it serves on (dropped after the server).
#[derive(Debug)]
pub struct ClusterApi {
    /// The server.
    pub server: ApiServer,
    /// A kubeconfig for it (`<run dir>/kubeconfig`).
    pub kubeconfig: std::path::PathBuf,
    /// The runtime it serves on.
    pub runtime: tokio::runtime::Runtime,
}

impl ClusterApi {
    /// Starts it for `topo` with `options`.
    ///
    /// # Errors
    /// When the runtime, the server or the kubeconfig cannot be made, or a Node not stored.
    pub fn start(topo: &crate::netns::Topology, options: Options) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("a Tokio runtime")?;
        let node1 = topo.node(0);
        let server = runtime
            .block_on(ApiServer::start_in(
                &node1.ns,
                SocketAddr::new(node1.underlay_v4.into(), 0),
                options,
            ))
            .context("starting the API server in node1's namespace")?;
        for node in topo.nodes() {
            server
                .apply_yaml(&crate::k8s::node_yaml(node))
                .with_context(|| format!("storing the Node {}", node.name))?;
        }
        let kubeconfig = topo.run_dir().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        Ok(Self {
            server,
            kubeconfig,
            runtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// One `GET` over a fresh connection; the whole response (headers and body).
    async fn raw_get(addr: SocketAddr, path: &str) -> Vec<u8> {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        response
    }

    /// Times the lists the agent makes at 30,000 Services and 30,000 `EndpointSlice`s of the
    /// sync benchmark's shape (`cargo test -p svc-tests --release --lib list_timing --
    /// --ignored --nocapture`). A timing, not a test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a timing, not a test"]
    async fn list_timing() {
        let api = ApiServer::start().await.unwrap();
        for i in 0..30_000_u32 {
            let (a, b) = (i >> 8, i & 0xff);
            api.apply_json(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
                "spec": {
                    "type": "ClusterIP", "clusterIP": format!("10.96.{a}.{b}"),
                    "clusterIPs": [format!("10.96.{a}.{b}")],
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                },
            }))
            .unwrap();
            let eps: Vec<Value> = (0..3)
                .map(|j| {
                    json!({"addresses": [format!("10.{j}.{a}.{b}")],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": "node2"})
                })
                .collect();
            api.apply_json(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": eps,
            }))
            .unwrap();
        }
        let not_ours =
            "%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless";
        let lists = [
            format!("/api/v1/services?labelSelector={not_ours}&resourceVersion=0"),
            format!(
                "/apis/discovery.k8s.io/v1/endpointslices?labelSelector=kubernetes.io%2Fservice-name%2C{not_ours}&resourceVersion=0"
            ),
        ];
        for round in 0..3 {
            let started = Instant::now();
            let mut bytes = 0;
            for path in &lists {
                bytes += raw_get(api.addr(), path).await.len();
            }
            let both = started.elapsed();
            let started = Instant::now();
            let mut page_count = 0;
            let mut path = "/api/v1/services?limit=500".to_owned();
            loop {
                let response = raw_get(api.addr(), &path).await;
                page_count += 1;
                let text = String::from_utf8_lossy(&response);
                let Some(token) = text.split("\"continue\":\"").nth(1) else {
                    break;
                };
                let token = token.split('"').next().unwrap();
                path = format!("/api/v1/services?limit=500&continue={token}");
            }
            let paged = started.elapsed();
            let started = Instant::now();
            let watch = raw_get(api.addr(), "/api/v1/services?watch=true&timeoutSeconds=0").await;
            let watched = started.elapsed();
            println!(
                "round {round}: two rv=0 lists {both:?} ({bytes} bytes); {page_count} pages of 500 \
                 Services {paged:?}; watch from now, 30,000 ADDED {watched:?} ({} bytes)",
                watch.len()
            );
        }
    }
}
