//! The agent's HTTP endpoints: `/metrics` on `--metrics-bind-address`, `/healthz` and `/livez`
//! on `--healthz-bind-address` (hyper 1, HTTP/1.1). Each listener has a task of its own and each
//! connection a task of its own, on the runtime's worker threads, while passes run on the
//! agent's main task: a pass never holds up a scrape or a probe, and a scrape reads only
//! atomics and the kernel's counters, never anything a pass holds.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{health::Probe, metrics::Recorder};

/// How long a client may take to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One answer.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }
}

/// Which endpoint a listener serves.
#[derive(Clone, Copy, Debug)]
enum Serves {
    Metrics,
    Health,
}

/// Binds the endpoints that are enabled (`None`: off), each failure naming its flag and
/// address, then serves them on tasks of their own for the agent's life. Both are bound before
/// either serves, so a start that fails here serves nothing.
///
/// # Errors
/// When an address cannot be bound (in use, not an address of this host).
pub async fn start(
    metrics: Option<SocketAddr>,
    healthz: Option<SocketAddr>,
    recorder: &Recorder,
) -> anyhow::Result<()> {
    let mut bound = Vec::new();
    for (flag, addr, serves) in [
        ("--metrics-bind-address", metrics, Serves::Metrics),
        ("--healthz-bind-address", healthz, Serves::Health),
    ] {
        let Some(addr) = addr else {
            info!("{flag} is empty: not served");
            continue;
        };
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "{flag} {addr}: cannot listen there (another process on that port? '' turns it off)"
            )
        })?;
        bound.push((listener, serves));
    }
    for (listener, serves) in bound {
        let addr = listener.local_addr()?;
        match serves {
            Serves::Metrics => info!(%addr, "serving /metrics"),
            Serves::Health => info!(%addr, "serving /healthz and /livez"),
        }
        tokio::spawn(accept(listener, serves, recorder.clone()));
    }
    Ok(())
}

async fn accept(listener: TcpListener, serves: Serves, recorder: Recorder) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = answer(serves, &recorder, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(response(reply)) }
            });
            let outcome = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = outcome {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

fn answer(serves: Serves, recorder: &Recorder, method: &Method, path: &str) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return Reply::text(405, "only GET and HEAD");
    }
    match (serves, path) {
        (Serves::Metrics, "/metrics") => Reply {
            status: 200,
            content_type: crate::metrics::CONTENT_TYPE,
            body: recorder.render(),
        },
        (Serves::Health, path) => match Probe::of_path(path) {
            Some(probe) => {
                let (status, body) = recorder.probe(probe);
                Reply {
                    status,
                    content_type: "application/json",
                    body,
                }
            }
            None => Reply::text(404, "not found: /healthz or /livez"),
        },
        (Serves::Metrics, _) => Reply::text(404, "not found: /metrics"),
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    /// A port the kernel picks: bound, its address taken, closed.
    async fn free_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_and_probes_and_names_the_flag_when_the_port_is_taken() {
        let recorder = Recorder::default();
        let (m, h) = (free_addr().await, free_addr().await);
        start(Some(m), Some(h), &recorder).await.unwrap();
        let (status, body) = get(m, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 0"));
        assert_eq!(get(m, "/other").await.0, 404);
        assert_eq!(
            get(m, "/healthz").await.0,
            404,
            "probes are on their own address"
        );
        let (status, body) = get(h, "/healthz").await;
        assert_eq!(status, 503, "before the first sync");
        assert!(body.contains("\"nodeEligible\": true"), "{body}");
        recorder.up_to_date();
        assert_eq!(get(h, "/healthz").await.0, 200);
        assert_eq!(get(h, "/livez").await.0, 200);

        let err = start(Some(m), None, &recorder).await.unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with(&format!("--metrics-bind-address {m}: cannot listen there")),
            "{text}"
        );
        let err = start(None, Some(h), &recorder).await.unwrap_err();
        assert!(format!("{err:#}").contains(&format!("--healthz-bind-address {h}")));
    }
}
