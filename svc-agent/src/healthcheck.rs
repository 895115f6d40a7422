//! The health-check node ports (`spec.healthCheckNodePort` of Services with
//! `externalTrafficPolicy: Local`), served as kube-proxy serves them
//! (`pkg/proxy/healthcheck/service_health.go`): a load balancer probes each node at that port
//! and sends the Service's external traffic only to nodes that answer 200.
//!
//! **What a port answers**, to any path and method (as kube-proxy): status 200 when this node
//! has ready endpoints of the Service (`local_endpoints > 0`) and the agent itself is healthy,
//! 503 otherwise; headers `Content-Type: application/json`, `X-Content-Type-Options: nosniff`
//! and `X-Load-Balancing-Endpoint-Weight: <local endpoints>` (a weight load balancers may use);
//! the body is kube-proxy's, byte for byte (indented with one tab per level where this shows
//! four spaces; no final newline):
//!
//! ```text
//! {
//!     "service": {
//!         "namespace": "default",
//!         "name": "web"
//!     },
//!     "localEndpoints": 1,
//!     "serviceProxyHealthy": true
//! }
//! ```
//!
//! `serviceProxyHealthy` is the agent's own health as `/healthz` computes it ([`Health`]):
//! programming is fresh (no change has waited longer than `--healthz-stale-after`). As in
//! kube-proxy, the node's eligibility (deletion, autoscaler taint) is left out here: it is
//! `/healthz`'s alone. A node whose agent is stale answers 503 on every port, so load
//! balancers steer away from a node whose datapath no longer follows the cluster.
//!
//! **Which ports**: the model computes them ([`model::DesiredState::health_checks`]: port ->
//! Service and its ready local endpoints); both sources hand them over after each pass that
//! changed them ([`Publisher::publish`], a `watch` channel: the pass never waits for a socket).
//! A task of its own follows the channel ([`Ports::follow`]): it opens a listener for each new
//! port, closes the listeners of ports that went away, and updates a port's Service and count
//! in place (a count that changes never closes a listener, so a probe never meets a closed
//! port because an endpoint moved).
//!
//! **Where**, as kube-proxy: without `--nodeport-addresses`, on every address of the node, both
//! families (one dual-stack `[::]` socket, `IPV6_V6ONLY` off, or `0.0.0.0` alone on a kernel
//! without IPv6); with it (`primary` or CIDRs), only on the node addresses it picks (the
//! `NodePort` addresses, [`hosts_for`]), one socket each, following them as they change (the
//! sources hand them over after each pass, [`Publisher::publish_hosts`]; a change reopens
//! every port on the new addresses). No address picked: every port waits, as one that
//! cannot be bound.
//!
//! **A port that cannot be bound** (another process holds it) is logged once with the port, the
//! Service and the OS error (a warning), counted (`svc_health_check_bind_failures_total`), and
//! tried again on every later change and every [`RETRY`] while it waits; it never stops the
//! agent nor the other ports. `svc_health_check_ports{state}` says how many ports are served
//! and how many wait.
//!
//! Closing a port also ends the connections it had accepted (a keep-alive probe connection
//! does not keep answering for a Service that is gone).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

#[cfg(doc)]
use crate::{health::Health, model};
use crate::{
    metrics::Recorder,
    model::{HealthCheck, NodePortAddresses},
};

/// The health-check ports to serve: port -> what it answers for.
pub type Checks = BTreeMap<u16, HealthCheck>;

/// How often ports that could not be bound are tried again while nothing changes.
pub const RETRY: Duration = Duration::from_secs(2);

/// How long a client may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Queued connections per listening socket.
const BACKLOG: i32 = 128;

/// The header kube-proxy sets to the local endpoint count.
pub const WEIGHT_HEADER: &str = "x-load-balancing-endpoint-weight";

/// Which addresses the listeners bind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// Every address of both families: `[::]` dual-stack, or `0.0.0.0` without IPv6.
    Wildcard,
    /// These addresses only (one listener each).
    Only(Vec<IpAddr>),
}

/// The addresses health-check ports listen on for the `NodePort` setting `which` when the
/// node's `NodePort` addresses are `nodeports`: every address without the flag, those
/// addresses with it.
#[must_use]
pub fn hosts_for(which: &NodePortAddresses, nodeports: &[IpAddr]) -> Hosts {
    match which {
        NodePortAddresses::All => Hosts::Wildcard,
        NodePortAddresses::Primary | NodePortAddresses::Cidrs(_) => Hosts::Only(nodeports.to_vec()),
    }
}

/// What one request gets (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// 200 or 503.
    pub status: u16,
    /// The value of [`WEIGHT_HEADER`]: the local endpoint count.
    pub weight: usize,
    /// The JSON body, as kube-proxy writes it.
    pub body: String,
}

/// The answer for `check` when the agent's own health is `proxy_healthy`.
#[must_use]
pub fn answer(check: &HealthCheck, proxy_healthy: bool) -> Answer {
    let count = check.local_endpoints;
    Answer {
        status: if count > 0 && proxy_healthy { 200 } else { 503 },
        weight: count,
        body: format!(
            "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
             \"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
            quoted(&check.namespace),
            quoted(&check.name),
        ),
    }
}

/// `s` as a JSON string (kube-proxy uses Go's `%q`, the same for the names Kubernetes allows).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn response(answer: Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(WEIGHT_HEADER, header::HeaderValue::from(answer.weight));
    response
}

/// Hands the health checks of each pass to the task that serves them (see the
/// [module docs](self)). Cheap to clone; the task ends when every clone is dropped, and its
/// ports close with it.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: Arc<watch::Sender<Arc<Checks>>>,
    hosts: Arc<watch::Sender<Hosts>>,
}

impl Publisher {
    /// Starts the serving task (on the current Tokio runtime) on every address of the node.
    #[must_use]
    pub fn start(recorder: Recorder) -> Self {
        Self::start_on(recorder, Hosts::Wildcard)
    }

    /// Starts the serving task with listeners on `hosts`.
    #[must_use]
    pub fn start_on(recorder: Recorder, hosts: Hosts) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Checks::new()));
        let (hosts_tx, hosts_rx) = watch::channel(hosts.clone());
        tokio::spawn(follow(rx, hosts_rx, Ports::new(recorder, hosts)));
        Self {
            tx: Arc::new(tx),
            hosts: Arc::new(hosts_tx),
        }
    }

    /// A publisher without a serving task, and the channel's other end (for tests of what the
    /// sources publish).
    #[cfg(test)]
    pub(crate) fn channel() -> (Self, watch::Receiver<Arc<Checks>>) {
        let (tx, rx) = watch::channel(Arc::new(Checks::new()));
        let (hosts, _) = watch::channel(Hosts::Wildcard);
        (
            Self {
                tx: Arc::new(tx),
                hosts: Arc::new(hosts),
            },
            rx,
        )
    }

    /// The model's health checks and `NodePort` addresses, after a pass: both published (each
    /// a cheap comparison when it did not change).
    pub fn publish_from(&self, model: &crate::model::Model) {
        self.publish_hosts(hosts_for(
            model.nodeport_setting(),
            model.nodeport_addresses(),
        ));
        self.publish(&model.state().health_checks);
    }

    /// The addresses to listen on from now on ([`hosts_for`] the model's `NodePort`
    /// addresses); the task is woken only when they differ from the last ones.
    pub fn publish_hosts(&self, hosts: Hosts) {
        self.hosts.send_if_modified(|current| {
            if *current == hosts {
                false
            } else {
                *current = hosts;
                true
            }
        });
    }

    /// The health checks to serve from now on (what the model's state holds after a pass).
    /// Copied, and the task woken, only when they differ from the last ones published: cheap
    /// to call after any pass.
    pub fn publish(&self, checks: &Checks) {
        self.tx.send_if_modified(|current| {
            if **current == *checks {
                false
            } else {
                *current = Arc::new(checks.clone());
                true
            }
        });
    }
}

/// The serving task: follows the channel until every [`Publisher`] is gone, retrying ports
/// that could not be bound every [`RETRY`] meanwhile.
async fn follow(
    mut rx: watch::Receiver<Arc<Checks>>,
    mut hosts: watch::Receiver<Hosts>,
    mut ports: Ports,
) {
    loop {
        let now = hosts.borrow_and_update().clone();
        ports.set_hosts(&now).await;
        let desired = Arc::clone(&rx.borrow_and_update());
        ports.follow(&desired);
        let retry = ports.unbound_count() > 0;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            changed = hosts.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep(RETRY), if retry => {}
        }
    }
    debug!("health-check ports: the sources are gone; closing every port");
}

/// A port being served: what it answers for (updated in place) and its accept tasks (one per
/// listening socket); dropping it closes the sockets and their connections.
#[derive(Debug)]
struct Served {
    check: Arc<RwLock<HealthCheck>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A port that could not be bound, waiting for the next try.
#[derive(Debug)]
struct Unbound {
    check: HealthCheck,
    /// The last error, as logged.
    error: String,
}

/// The listeners of the health-check ports, following a desired [`Checks`] (see the
/// [module docs](self)). Needs a Tokio runtime (each socket has an accept task).
#[derive(Debug)]
pub struct Ports {
    recorder: Recorder,
    hosts: Hosts,
    served: BTreeMap<u16, Served>,
    unbound: BTreeMap<u16, Unbound>,
}

impl Ports {
    /// No port yet; listeners bind `hosts`; answers read the agent's health from `recorder`,
    /// which also counts ports and bind failures.
    #[must_use]
    pub fn new(recorder: Recorder, hosts: Hosts) -> Self {
        Self {
            recorder,
            hosts,
            served: BTreeMap::new(),
            unbound: BTreeMap::new(),
        }
    }

    /// Listens on `hosts` from now on: when they differ from the current ones, every served
    /// port is closed (its sockets closed when this returns) and waits to be bound on them
    /// (the next [`follow`](Self::follow)).
    pub async fn set_hosts(&mut self, hosts: &Hosts) {
        if self.hosts == *hosts {
            return;
        }
        info!(from = ?self.hosts, to = ?hosts, ports = self.served.len(),
            "health-check ports move to other addresses (the NodePort addresses changed)");
        self.hosts = hosts.clone();
        for (port, mut served) in std::mem::take(&mut self.served) {
            let check = read(&served.check);
            // Aborted tasks drop their sockets when they next run: wait for that, so the
            // same port can be bound again at once.
            for task in std::mem::take(&mut served.tasks) {
                task.abort();
                let _ = task.await;
            }
            self.unbound.insert(
                port,
                Unbound {
                    check,
                    error: String::new(),
                },
            );
        }
    }

    /// Makes the served ports those of `desired`: closes the others, updates the served ones
    /// in place, binds the new ones and tries again those that could not be bound before.
    pub fn follow(&mut self, desired: &Checks) {
        self.served.retain(|port, served| {
            let keep = desired.contains_key(port);
            if !keep {
                let check = read(&served.check);
                info!(port, service = %name(&check), "health-check port closed");
            }
            keep
        });
        self.unbound.retain(|port, _| desired.contains_key(port));
        for (&port, check) in desired {
            if let Some(served) = self.served.get(&port) {
                let mut current = served.check.write().unwrap_or_else(PoisonError::into_inner);
                if *current != *check {
                    if (&current.namespace, &current.name) != (&check.namespace, &check.name) {
                        info!(port, from = %name(&current), to = %name(check),
                            "health-check port now answers for another Service");
                    }
                    debug!(port, service = %name(check), local_endpoints = check.local_endpoints,
                        "health-check port updated");
                    current.clone_from(check);
                }
                continue;
            }
            self.open(port, check);
        }
        self.recorder
            .health_check_ports(self.served.len(), self.unbound.len());
    }

    /// Binds `port` for `check`, or notes why it could not.
    fn open(&mut self, port: u16, check: &HealthCheck) {
        match bind(&self.hosts, port) {
            Ok(listeners) => {
                let shared = Arc::new(RwLock::new(check.clone()));
                let addrs: Vec<String> = listeners
                    .iter()
                    .filter_map(|l| l.local_addr().ok())
                    .map(|a| a.to_string())
                    .collect();
                let tasks = listeners
                    .into_iter()
                    .map(|l| tokio::spawn(accept(l, Arc::clone(&shared), self.recorder.clone())))
                    .collect();
                let retried = self.unbound.remove(&port).is_some();
                info!(port, service = %name(check), local_endpoints = check.local_endpoints,
                    addresses = %addrs.join(","), retried, "serving the health-check port");
                self.served.insert(
                    port,
                    Served {
                        check: shared,
                        tasks,
                    },
                );
            }
            Err(e) => {
                let error = e.to_string();
                self.recorder.health_check_bind_failed();
                let said = self.unbound.get(&port).is_some_and(|u| {
                    u.error == error
                        && (&u.check.namespace, &u.check.name) == (&check.namespace, &check.name)
                });
                if said {
                    debug!(port, service = %name(check), error = %error,
                        "health-check port still cannot be bound; trying again later");
                } else {
                    warn!(port, service = %name(check), error = %error,
                        "cannot listen on the health-check port (another process holds it?); \
                         load balancers probing it see this node as down; trying again on \
                         every change and every {} s", RETRY.as_secs());
                }
                self.unbound.insert(
                    port,
                    Unbound {
                        check: check.clone(),
                        error,
                    },
                );
            }
        }
    }

    /// The ports served now.
    pub fn served(&self) -> impl Iterator<Item = u16> + '_ {
        self.served.keys().copied()
    }

    /// How many ports wait to be bound.
    #[must_use]
    pub fn unbound_count(&self) -> usize {
        self.unbound.len()
    }

    /// Why `port` is not served (the OS error), when it waits to be bound.
    #[must_use]
    pub fn unbound_error(&self, port: u16) -> Option<&str> {
        self.unbound.get(&port).map(|u| u.error.as_str())
    }
}

fn read(check: &RwLock<HealthCheck>) -> HealthCheck {
    check.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// `namespace/name` of the Service.
fn name(check: &HealthCheck) -> String {
    format!("{}/{}", check.namespace, check.name)
}

/// Listening sockets for `port` on `hosts` (all or none).
fn bind(hosts: &Hosts, port: u16) -> io::Result<Vec<TcpListener>> {
    match hosts {
        Hosts::Wildcard => {
            let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
            match listen(any6, true) {
                Ok(l) => Ok(vec![l]),
                Err(e) if no_ipv6(&e) => {
                    let any4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
                    Ok(vec![listen(any4, false)?])
                }
                Err(e) => Err(e),
            }
        }
        Hosts::Only(ips) if ips.is_empty() => Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no node address is picked by --nodeport-addresses",
        )),
        Hosts::Only(ips) => ips
            .iter()
            .map(|&ip| listen(SocketAddr::new(ip, port), false))
            .collect(),
    }
}

/// Whether `e` says this kernel (or namespace) has no IPv6 to listen on.
fn no_ipv6(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| {
        [
            Errno::EAFNOSUPPORT,
            Errno::EPROTONOSUPPORT,
            Errno::EADDRNOTAVAIL,
        ]
        .contains(&Errno::from_raw(n))
    })
}

/// A listening TCP socket on `addr`; an IPv6 wildcard with `dual_stack` takes IPv4 too.
fn listen(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(!dual_stack)?;
    }
    // As Go's listeners (kube-proxy's): a port left in TIME_WAIT by a closed listener can be
    // bound again at once; a port another socket listens on still cannot.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Accepts connections on one socket, each served on a task of this one's set: aborting this
/// task (closing the port) ends them too.
async fn accept(listener: TcpListener, check: Arc<RwLock<HealthCheck>>, recorder: Recorder) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, Arc::clone(&check), recorder.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    warn!(error = %e, "accepting a health-check connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(stream: tokio::net::TcpStream, check: Arc<RwLock<HealthCheck>>, recorder: Recorder) {
    let service = service_fn(move |_: Request<Incoming>| {
        let healthy = recorder.health().check().fresh;
        let reply = response(answer(&read(&check), healthy));
        async move { Ok::<_, Infallible>(reply) }
    });
    let outcome = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = outcome {
        debug!(error = %e, "health-check connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn check(name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            local_endpoints,
        }
    }

    /// A port the kernel picks on loopback: bound, its number taken, closed.
    fn free_port() -> u16 {
        std::net::TcpListener::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn loopback_ports(recorder: &Recorder) -> Ports {
        Ports::new(recorder.clone(), Hosts::Only(vec![LOOPBACK]))
    }

    /// One HTTP/1.1 exchange on `stream` (kept open): status line, headers (lower-case names,
    /// in order), body.
    async fn exchange(
        stream: &mut tokio::net::TcpStream,
        request: &str,
    ) -> io::Result<(String, Vec<(String, String)>, String)> {
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk))
                .await
                .expect("an answer within 2 s")?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed mid-answer: {:?}", String::from_utf8_lossy(&buf)),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let mut lines = head.lines();
            let status = lines.next().unwrap().to_owned();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (k, v) = l.split_once(": ").unwrap();
                    (k.to_ascii_lowercase(), v.to_owned())
                })
                .collect();
            let length: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            if request.starts_with("HEAD ") || body.len() >= length {
                return Ok((status, headers, body.to_owned()));
            }
        }
    }

    async fn get(port: u16) -> io::Result<(String, Vec<(String, String)>, String)> {
        let mut stream = tokio::net::TcpStream::connect((LOOPBACK, port)).await?;
        exchange(&mut stream, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn answers_as_kube_proxy_byte_for_byte() {
        let some = answer(&check("web", 2), true);
        assert_eq!(some.status, 200);
        assert_eq!(some.weight, 2);
        assert_eq!(
            some.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let none = answer(&check("web", 0), true);
        assert_eq!((none.status, none.weight), (503, 0));
        assert_eq!(
            none.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 0,\n\t\"serviceProxyHealthy\": true\n}"
        );
        // A stale agent fails every port, whatever its endpoints.
        let stale = answer(&check("web", 3), false);
        assert_eq!((stale.status, stale.weight), (503, 3));
        assert!(
            stale
                .body
                .ends_with("\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": false\n}")
        );
        // The length kube-proxy's answer has for this Service (127 bytes, seen on the wire).
        let wp = HealthCheck {
            namespace: "default".into(),
            name: "wp-nginx-service".into(),
            local_endpoints: 1,
        };
        assert_eq!(answer(&wp, true).body.len(), 127);
        let parsed: serde_json::Value = serde_json::from_str(&some.body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );
    }

    #[tokio::test]
    async fn headers_status_and_body_on_the_wire_for_any_path_and_method() {
        let recorder = Recorder::default();
        recorder.up_to_date();
        let mut ports = loopback_ports(&recorder);
        let port = free_port();
        ports.follow(&Checks::from([(port, check("web", 1))]));
        let (status, headers, body) = get(port).await.unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&headers, WEIGHT_HEADER), Some("1"));
        assert_eq!(
            header(&headers, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(body, answer(&check("web", 1), true).body);

        let mut stream = tokio::net::TcpStream::connect((LOOPBACK, port))
            .await
            .unwrap();
        for request in [
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /anything?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (status, _, body) = exchange(&mut stream, request).await.unwrap();
            assert_eq!(status, "HTTP/1.1 200 OK", "{request}");
            assert!(body.contains("\"localEndpoints\": 1"), "{body}");
        }
        let (status, headers, body) =
            exchange(&mut stream, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(header(&headers, WEIGHT_HEADER), Some("1"));
        assert_eq!(body, "");
    }

    #[tokio::test]
    async fn ports_move_with_the_nodeport_addresses() {
        let recorder = Recorder::default();
        recorder.up_to_date();
        let mut ports = loopback_ports(&recorder);
        let port = free_port();
        let checks = Checks::from([(port, check("web", 1))]);
        ports.follow(&checks);
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        assert!(
            tokio::net::TcpStream::connect((LOOPBACK, port))
                .await
                .is_ok()
        );
        assert!(tokio::net::TcpStream::connect((other, port)).await.is_err());

        ports.set_hosts(&Hosts::Only(vec![other])).await;
        ports.follow(&checks);
        assert_eq!(ports.served().collect::<Vec<_>>(), [port]);
        assert!(tokio::net::TcpStream::connect((other, port)).await.is_ok());
        assert!(
            tokio::net::TcpStream::connect((LOOPBACK, port))
                .await
                .is_err()
        );

        // No address picked: the port waits, saying why.
        ports.set_hosts(&Hosts::Only(vec![])).await;
        ports.follow(&checks);
        assert_eq!(ports.served().count(), 0);
        let why = ports.unbound_error(port).expect("waiting");
        assert!(why.contains("--nodeport-addresses"), "{why}");
        assert!(tokio::net::TcpStream::connect((other, port)).await.is_err());

        let all = NodePortAddresses::All;
        assert_eq!(hosts_for(&all, &[other]), Hosts::Wildcard);
        let primary = NodePortAddresses::Primary;
        assert_eq!(hosts_for(&primary, &[other]), Hosts::Only(vec![other]));
    }

    #[tokio::test]
    async fn counts_change_in_place_and_the_set_of_ports_follows_the_map() {
        let recorder = Recorder::default();
        recorder.up_to_date();
        let mut ports = loopback_ports(&recorder);
        let (a, b, c) = (free_port(), free_port(), free_port());
        ports.follow(&Checks::from([(a, check("a", 1)), (b, check("b", 2))]));
        assert_eq!(ports.served().collect::<Vec<_>>(), {
            let mut v = vec![a, b];
            v.sort_unstable();
            v
        });
        // A connection kept open across the change: the same listener answers the new count.
        let mut kept = tokio::net::TcpStream::connect((LOOPBACK, a)).await.unwrap();
        let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let (status, headers, _) = exchange(&mut kept, request).await.unwrap();
        assert_eq!(
            (status.as_str(), header(&headers, WEIGHT_HEADER)),
            ("HTTP/1.1 200 OK", Some("1"))
        );
        ports.follow(&Checks::from([(a, check("a", 0)), (b, check("b", 2))]));
        let (status, headers, body) = exchange(&mut kept, request).await.unwrap();
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(header(&headers, WEIGHT_HEADER), Some("0"));
        assert_eq!(body, answer(&check("a", 0), true).body);
        // Another Service takes the port: answered in place too.
        ports.follow(&Checks::from([(a, check("a2", 4)), (b, check("b", 2))]));
        let (_, _, body) = exchange(&mut kept, request).await.unwrap();
        assert!(
            body.contains("\"name\": \"a2\"") && body.contains("\"localEndpoints\": 4"),
            "{body}"
        );

        // b goes, c comes.
        ports.follow(&Checks::from([(a, check("a2", 4)), (c, check("c", 1))]));
        let mut want = vec![a, c];
        want.sort_unstable();
        assert_eq!(ports.served().collect::<Vec<_>>(), want);
        assert!(get(c).await.unwrap().2.contains("\"name\": \"c\""));
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match get(b).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                other => assert!(
                    Instant::now() < deadline,
                    "port {b} still open after it went away: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Everything goes: the kept connection is closed with its port.
        ports.follow(&Checks::new());
        assert_eq!(ports.served().count(), 0);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), kept.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the kept connection ends with its port: {read:?}"
        );
        let text = recorder.render();
        assert!(
            text.contains("svc_health_check_ports{state=\"served\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_busy_port_is_reported_counted_and_retried_and_the_others_are_served() {
        let recorder = Recorder::default();
        recorder.up_to_date();
        let mut ports = loopback_ports(&recorder);
        let holder = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap();
        let busy = holder.local_addr().unwrap().port();
        let free = free_port();
        let desired = Checks::from([(busy, check("busy", 1)), (free, check("free", 1))]);
        ports.follow(&desired);
        assert_eq!(ports.served().collect::<Vec<_>>(), [free]);
        assert_eq!(ports.unbound_count(), 1);
        let error = ports.unbound_error(busy).unwrap();
        assert!(error.contains("in use"), "{error}");
        assert_eq!(get(free).await.unwrap().0, "HTTP/1.1 200 OK");
        let text = recorder.render();
        for series in [
            "svc_health_check_ports{state=\"served\"} 1",
            "svc_health_check_ports{state=\"unbound\"} 1",
            "svc_health_check_bind_failures_total 1",
        ] {
            assert!(text.contains(series), "{series} in:\n{text}");
        }
        // Retried on the next change (or timer): still busy, counted again.
        ports.follow(&desired);
        assert!(
            recorder
                .render()
                .contains("svc_health_check_bind_failures_total 2")
        );
        // The other process lets go: the next try binds it.
        drop(holder);
        ports.follow(&desired);
        assert_eq!(ports.unbound_count(), 0);
        assert_eq!(ports.served().count(), 2);
        let (status, _, body) = get(busy).await.unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("\"name\": \"busy\""), "{body}");
        // A port that waits and is no longer wanted is forgotten.
        let holder = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap();
        let busy2 = holder.local_addr().unwrap().port();
        ports.follow(&Checks::from([(busy2, check("x", 1))]));
        assert_eq!(ports.unbound_count(), 1);
        ports.follow(&Checks::new());
        assert_eq!(ports.unbound_count(), 0);
        assert!(
            recorder
                .render()
                .contains("svc_health_check_ports{state=\"unbound\"} 0")
        );
    }

    #[tokio::test]
    async fn the_task_follows_what_is_published_and_the_agents_health() {
        let recorder = Recorder::default();
        let publisher = Publisher::start_on(recorder.clone(), Hosts::Only(vec![LOOPBACK]));
        let port = free_port();
        publisher.publish(&Checks::from([(port, check("web", 2))]));
        let deadline = Instant::now() + Duration::from_secs(2);
        let (status, _, body) = loop {
            match get(port).await {
                Ok(answer) => break answer,
                Err(e) => assert!(Instant::now() < deadline, "port {port} not served: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The first sync has not programmed the maps yet: not healthy.
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(
            body.ends_with("\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": false\n}"),
            "{body}"
        );
        recorder.up_to_date();
        assert_eq!(get(port).await.unwrap().0, "HTTP/1.1 200 OK");
        // The publisher gone (the source ended), the port closes.
        drop(publisher);
        let deadline = Instant::now() + Duration::from_secs(2);
        while get(port).await.is_ok() {
            assert!(Instant::now() < deadline, "port {port} still open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn no_ipv6_is_told_from_a_busy_port() {
        use nix::errno::Errno;
        let err = |e: Errno| io::Error::from_raw_os_error(e as i32);
        assert!(no_ipv6(&err(Errno::EAFNOSUPPORT)));
        assert!(no_ipv6(&err(Errno::EADDRNOTAVAIL)));
        assert!(!no_ipv6(&err(Errno::EADDRINUSE)));
        assert!(!no_ipv6(&err(Errno::EACCES)));
    }
}
