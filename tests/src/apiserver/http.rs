//! The HTTP side of the test API server: routing, `GET` of one object, paginated lists and
//! chunked watch streams, in the wire format of the real API server.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use super::{
    RequestRecord, Shared,
    kind::Kind,
    selector::{FieldSelector, Filter, LabelSelector},
    store::{Change, Compacted, Key, set_resource_version},
};

/// The body of every response.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The largest request body accepted (`POST`/`PATCH` of an Event).
const MAX_BODY: usize = 1 << 20;

/// Answers one request, recording it.
pub(crate) async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let params = Params::parse(&query);
    let response = match shared.take_failure() {
        Some(code) => injected_failure(code),
        None if method == Method::POST || method == Method::PATCH => {
            match read_body(request).await {
                Ok(body) => write(shared, &method, &path, &body),
                Err(response) => response,
            }
        }
        None => route(shared, &method, &path, &params),
    };
    shared.record(RequestRecord {
        at: std::time::Instant::now(),
        method: method.to_string(),
        path,
        query,
        watch: params.watch(),
        status: response.status().as_u16(),
    });
    response
}

fn route(shared: &Arc<Shared>, method: &Method, path: &str, params: &Params) -> Response<Body> {
    if path == "/version" {
        return json_response(StatusCode::OK, version().to_string().into());
    }
    let Some((kind, namespace, name)) = parse_path(path) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if method != Method::GET {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the test API server only serves GET, not {method}"),
        );
    }
    let labels = LabelSelector::parse(params.get("labelSelector").unwrap_or_default());
    let fields = FieldSelector::parse(params.get("fieldSelector").unwrap_or_default(), kind);
    let (labels, fields) = match (labels, fields) {
        (Ok(l), Ok(f)) => (l, f),
        (Err(e), _) | (_, Err(e)) => return bad_request(&e),
    };
    let filter = Filter {
        kind,
        namespace,
        name,
        labels,
        fields,
    };
    if params.watch() {
        watch(shared, filter, params)
    } else if filter.name.is_some() {
        get(shared, &filter)
    } else {
        list(shared, &filter, params)
    }
}

/// Splits `/api/v1/namespaces/NS/services/NAME` into kind, namespace and name.
fn parse_path(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    let (prefix, rest) = Kind::ALL.into_iter().find_map(|k| {
        let rest = path.strip_prefix(k.prefix())?.strip_prefix('/')?;
        Some((k.prefix(), rest))
    })?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (namespace, plural, name) = match parts.as_slice() {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.prefix() == prefix && k.plural() == plural)?;
    // Namespaced kinds are named only inside a namespace; cluster-scoped ones never are.
    if kind.namespaced() != namespace.is_some() && (name.is_some() || !kind.namespaced()) {
        return None;
    }
    let valid = |s: &str| !s.is_empty();
    if !namespace.is_none_or(valid) || !name.is_none_or(valid) {
        return None;
    }
    Some((kind, namespace.map(str::to_owned), name.map(str::to_owned)))
}

fn get(shared: &Shared, filter: &Filter) -> Response<Body> {
    let name = filter.name.clone().unwrap_or_default();
    let key = Key {
        kind: filter.kind,
        namespace: filter.namespace.clone().unwrap_or_default(),
        name: name.clone(),
    };
    let store = shared.store();
    if let Some(object) = store.objects().get(&key) {
        return json_response(StatusCode::OK, object.to_string().into());
    }
    let mut status = status_json(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", filter.kind.plural()),
    );
    status["details"] = json!({"name": name, "kind": filter.kind.plural()});
    json_response(StatusCode::NOT_FOUND, status.to_string().into())
}

// ---------------------------------------------------------------------------------------------
// Writes (Events only)
// ---------------------------------------------------------------------------------------------

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let body = http_body_util::Limited::new(request.into_body(), MAX_BODY);
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(status_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            &format!("reading the request body: {e}"),
        )),
    }
}

/// `POST .../events` creates an Event (`409 AlreadyExists` if the name is taken); `PATCH
/// .../events/NAME` applies a JSON merge patch (RFC 7386) to one. Other kinds are read-only
/// (`405`), as the agent must never write them.
fn write(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let Some((kind, namespace, name)) = parse_path(path) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if kind != Kind::Event || namespace.is_none() {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!(
                "the test API server accepts {method} only for namespaced events.k8s.io/v1 Events"
            ),
        );
    }
    let namespace = namespace.unwrap_or_default();
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return bad_request("the request body is not JSON");
    };
    let created = *method == Method::POST;
    let result = shared.change(|store| {
        if created {
            if name.is_some() {
                return Err((
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "POST goes to the collection".to_owned(),
                ));
            }
            object["apiVersion"] = Kind::Event.api_version().into();
            object["kind"] = Kind::Event.name().into();
            let object_ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str);
            if object_ns.is_some_and(|ns| ns != namespace) {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the namespace of the object does not match the URL".to_owned(),
                ));
            }
            object["metadata"]["namespace"] = namespace.clone().into();
            let event_name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let key = Key {
                kind,
                namespace: namespace.clone(),
                name: event_name.clone(),
            };
            if store.objects().contains_key(&key) {
                return Err((
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("events \"{event_name}\" already exists"),
                ));
            }
            store
                .apply(object)
                .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e))
        } else {
            let name = name.clone().unwrap_or_default();
            let key = Key {
                kind,
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let Some(existing) = store.objects().get(&key) else {
                return Err((
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("events \"{name}\" not found"),
                ));
            };
            let mut patched = (**existing).clone();
            merge_patch(&mut patched, &object);
            store
                .apply(patched)
                .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e))
        }
    });
    match result {
        Ok(stored) => json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            stored.to_string().into(),
        ),
        Err((code, reason, message)) => status_response(code, reason, &message),
    }
}

/// Applies a JSON merge patch (RFC 7386): objects merge key by key, `null` removes a key,
/// anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lists
// ---------------------------------------------------------------------------------------------

/// Where a paginated list goes on: the snapshot's version and the last key returned.
#[derive(Debug, PartialEq, Eq)]
struct ContinueToken {
    rv: u64,
    kind: Kind,
    after: Key,
}

impl ContinueToken {
    /// Opaque to clients, like the real one (which is base64 of JSON).
    fn encode(&self) -> String {
        let text = format!(
            "{}|{}|{}|{}",
            self.rv, self.kind, self.after.namespace, self.after.name
        );
        text.bytes().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    fn decode(token: &str) -> Option<Self> {
        let bytes = (0..token.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(4, '|');
        let rv = parts.next()?.parse().ok()?;
        let kind_name = parts.next()?;
        let kind = Kind::ALL.into_iter().find(|k| k.name() == kind_name)?;
        let namespace = parts.next()?.to_owned();
        let name = parts.next()?.to_owned();
        Some(Self {
            rv,
            kind,
            after: Key {
                kind,
                namespace,
                name,
            },
        })
    }
}

fn list(shared: &Shared, filter: &Filter, params: &Params) -> Response<Body> {
    let limit = match params.get("limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let rv_param = params.get("resourceVersion").unwrap_or_default();
    let exact = params.get("resourceVersionMatch") == Some("Exact");
    let token = match params.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(_) if !rv_param.is_empty() => {
            return bad_request("specifying resource version is not allowed when using continue");
        }
        Some(text) => match ContinueToken::decode(text) {
            Some(token) if token.kind == filter.kind => Some(token),
            _ => return bad_request(&format!("continue key is not valid: {text}")),
        },
    };
    let requested = match rv_param {
        "" => None,
        text => match text.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resourceVersion {text:?}")),
        },
    };
    if exact && requested.is_none_or(|rv| rv == 0) {
        return bad_request("resourceVersionMatch=Exact needs a resourceVersion other than 0");
    }
    let store = shared.store();
    if let Some(rv) = requested
        && rv > store.rv()
    {
        return too_large(rv, store.rv());
    }
    // The version to serve at: the token's snapshot, an exact version, or the current one
    // (which is never older than any version the client names).
    let at = match (&token, requested) {
        (Some(token), _) => token.rv,
        (None, Some(rv)) if exact => rv,
        (None, _) => store.rv(),
    };
    let snapshot = if at == store.rv() {
        Ok(store.objects().clone())
    } else {
        store.snapshot(at)
    };
    drop(store);
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(Compacted { requested, oldest }) => {
            let message = if token.is_some() {
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter."
                    .to_owned()
            } else {
                format!("too old resource version: {requested} ({oldest})")
            };
            return status_response(StatusCode::GONE, "Expired", &message);
        }
    };
    // A list at resourceVersion=0 is served from the watch cache, which ignores `limit`.
    let limit = if rv_param == "0" { 0 } else { limit };
    let mut selected = snapshot
        .iter()
        .filter(|(key, _)| filter.covers(key))
        .filter(|(key, _)| token.as_ref().is_none_or(|t| **key > t.after))
        .filter(|(_, object)| filter.selects(object));
    let mut items = Vec::new();
    let mut last = None;
    for (key, object) in selected.by_ref() {
        items.push(list_item(object));
        last = Some(key);
        if limit > 0 && items.len() == limit {
            break;
        }
    }
    let remaining = selected.count();
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if remaining > 0
        && let Some(after) = last
    {
        let next = ContinueToken {
            rv: at,
            kind: filter.kind,
            after: after.clone(),
        };
        metadata["continue"] = next.encode().into();
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    let body = json!({
        "kind": format!("{}List", filter.kind.name()),
        "apiVersion": filter.kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, body.to_string().into())
}

/// An object as a list item: the real API server leaves out `apiVersion` and `kind`.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

fn too_large(requested: u64, current: u64) -> Response<Body> {
    let mut status = status_json(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        &format!("Too large resource version: {requested}, current resource version: {current}"),
    );
    status["details"] = json!({"causes": [{"reason": "ResourceVersionTooLarge",
        "message": "Too large resource version"}], "retryAfterSeconds": 1});
    json_response(StatusCode::GATEWAY_TIMEOUT, status.to_string().into())
}

// ---------------------------------------------------------------------------------------------
// Watches
// ---------------------------------------------------------------------------------------------

/// A chunked stream of watch events, one JSON object per line.
fn watch(shared: &Arc<Shared>, filter: Filter, params: &Params) -> Response<Body> {
    let timeout = match params.get("timeoutSeconds").map(str::parse::<u64>) {
        None => shared.options.max_watch_duration,
        Some(Ok(secs)) => Duration::from_secs(secs).min(shared.options.max_watch_duration),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    let rv_param = params.get("resourceVersion").unwrap_or_default();
    let initial = rv_param.is_empty() || rv_param == "0";
    let from = if initial {
        None
    } else {
        match rv_param.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(&format!("invalid resourceVersion {rv_param:?}")),
        }
    };
    let Some(guard) = WatchGuard::new(shared) else {
        return status_response(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "too many open watches on the test API server",
        );
    };
    let bookmarks = params.get("allowWatchBookmarks") == Some("true");
    let send_initial = params.get("sendInitialEvents");
    let mut state = WatchState {
        shared: Arc::clone(shared),
        kind: filter.kind,
        filter,
        from: 0,
        pending: VecDeque::new(),
        rv_rx: shared.rv_tx.subscribe(),
        drop_rx: shared.drop_tx.subscribe(),
        deadline: Instant::now() + timeout,
        bookmark_every: shared.options.bookmark_interval.filter(|_| bookmarks),
        next_bookmark: Instant::now(),
        finished: false,
        _guard: guard,
    };
    if let Some(every) = state.bookmark_every {
        state.next_bookmark += every;
    }
    if let Some(rv) = from {
        state.from = rv;
    } else {
        // "Get state and start at most recent": synthetic ADDED events for what exists
        // now, then (sendInitialEvents=true) a bookmark marking their end.
        state.rv_rx.borrow_and_update();
        let store = shared.store();
        if send_initial != Some("false") {
            for (key, object) in store.objects() {
                if state.filter.covers(key) && state.filter.selects(object) {
                    state.pending.push_back(event_line("ADDED", object));
                }
            }
        }
        state.from = store.rv();
        if send_initial == Some("true") {
            let line = bookmark_line(state.kind, state.from, true);
            state.pending.push_back(line);
        }
    }
    let stream = futures_util::stream::unfold(state, WatchState::next_frame);
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Counts an open watch for as long as it lives.
struct WatchGuard(Arc<Shared>);

impl WatchGuard {
    fn new(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.options.max_watches;
        shared
            .open_watches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Self(Arc::clone(shared)))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open watch: what it selects, the version it has sent everything up to, and the
/// lines waiting to be sent (at most one history's worth).
struct WatchState {
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    from: u64,
    pending: VecDeque<Bytes>,
    rv_rx: watch::Receiver<u64>,
    drop_rx: watch::Receiver<u64>,
    deadline: Instant,
    bookmark_every: Option<Duration>,
    next_bookmark: Instant,
    finished: bool,
    _guard: WatchGuard,
}

impl WatchState {
    async fn next_frame(mut self) -> Option<(Result<Frame<Bytes>, io::Error>, Self)> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some((Ok(Frame::data(line)), self));
            }
            if self.finished {
                return None;
            }
            self.catch_up();
            if !self.pending.is_empty() {
                continue;
            }
            let bookmark_at = self.bookmark_every.map(|_| self.next_bookmark);
            tokio::select! {
                () = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.drop_rx.changed() => {
                    // Abort the response mid-stream: hyper closes the connection without
                    // the final chunk, as a dying API server or load balancer would.
                    self.finished = true;
                    self.pending.clear();
                    let error = io::Error::new(io::ErrorKind::ConnectionAborted, "watch dropped");
                    return Some((Err(error), self));
                }
                changed = self.rv_rx.changed() => if changed.is_err() { return None },
                () = sleep_until_some(bookmark_at) => {
                    self.pending.push_back(bookmark_line(self.kind, self.from, false));
                    if let Some(every) = self.bookmark_every {
                        self.next_bookmark = Instant::now() + every;
                    }
                }
            }
        }
    }

    /// Queues the events of every change since `from`, or the `410 Expired` error event
    /// when the history no longer reaches back that far.
    fn catch_up(&mut self) {
        self.rv_rx.borrow_and_update();
        let store = self.shared.store();
        let result = store.changes_since(self.from).map(|changes| {
            changes
                .filter_map(|c| watch_event(&self.filter, c))
                .collect::<Vec<_>>()
        });
        match result {
            Ok(lines) => {
                self.pending.extend(lines);
                self.from = store.rv();
            }
            Err(Compacted { requested, oldest }) => {
                let status = status_json(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {requested} ({oldest})"),
                );
                let line = format!("{{\"type\":\"ERROR\",\"object\":{status}}}\n");
                self.pending.push_back(line.into());
                self.finished = true;
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The event a watcher sees for a change, like the API server's watch cache makes it: an
/// object entering the selection is ADDED, one leaving it DELETED (its previous state, at
/// the change's version).
fn watch_event(filter: &Filter, change: &Change) -> Option<Bytes> {
    if !filter.covers(&change.key) {
        return None;
    }
    let was = change.prev.as_ref().is_some_and(|p| filter.selects(p));
    let is = !change.deleted && filter.selects(&change.object);
    match (was, is) {
        (true, true) => Some(event_line("MODIFIED", &change.object)),
        (false, true) => Some(event_line("ADDED", &change.object)),
        (true, false) if change.deleted => Some(event_line("DELETED", &change.object)),
        (true, false) => {
            let mut prev = change.prev.as_deref().cloned().unwrap_or_default();
            set_resource_version(&mut prev, change.rv);
            Some(event_line("DELETED", &prev))
        }
        (false, false) => None,
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = format!("{{\"type\":\"{kind}\",\"object\":").into_bytes();
    // Writing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut line, object);
    line.extend_from_slice(b"}\n");
    line.into()
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": kind.name(), "apiVersion": kind.api_version(),
                        "metadata": metadata});
    event_line("BOOKMARK", &object)
}

// ---------------------------------------------------------------------------------------------
// Responses and query parameters
// ---------------------------------------------------------------------------------------------

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let body = Full::new(body)
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A `meta.k8s.io/v1` `Status` failure, as every error of the real API server is.
fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, status_json(code, reason, message).to_string().into())
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn injected_failure(code: u16) -> Response<Body> {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let reason = match code {
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
        StatusCode::GATEWAY_TIMEOUT => "Timeout",
        _ => "InternalError",
    };
    status_response(code, reason, "failure injected by the test (fail_next)")
}

fn version() -> Value {
    json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-svc-test",
           "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
           "goVersion": "", "compiler": "gc", "platform": "linux/amd64"})
}

/// Decoded query parameters.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: &str) -> Self {
        let pairs = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn watch(&self) -> bool {
        matches!(self.get("watch"), Some("true" | "1"))
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`%XX`, `+` for a space).
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                match text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_kind_namespace_and_name() {
        let svc = parse_path("/api/v1/namespaces/default/services/web").unwrap();
        assert_eq!(
            svc,
            (
                Kind::Service,
                Some("default".to_owned()),
                Some("web".to_owned())
            )
        );
        assert_eq!(
            parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap(),
            (Kind::EndpointSlice, None, None)
        );
        assert_eq!(
            parse_path("/api/v1/nodes/n1").unwrap(),
            (Kind::Node, None, Some("n1".to_owned()))
        );
        assert!(parse_path("/api/v1/services/web").is_none());
        assert!(parse_path("/api/v1/namespaces/x/nodes").is_none());
        assert!(parse_path("/api/v1/pods").is_none());
        assert!(parse_path("/apis/discovery.k8s.io/v1/services").is_none());
    }

    #[test]
    fn merge_patches_follow_rfc_7386() {
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut target,
            &json!({"a": null, "b": {"c": 5}, "e": [2], "f": "new"}),
        );
        assert_eq!(target, json!({"b": {"c": 5, "d": 3}, "e": [2], "f": "new"}));
        let mut scalar = json!(1);
        merge_patch(&mut scalar, &json!({"x": 1}));
        assert_eq!(scalar, json!({"x": 1}));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let token = ContinueToken {
            rv: 42,
            kind: Kind::Service,
            after: Key {
                kind: Kind::Service,
                namespace: "ns".to_owned(),
                name: "a|b".to_owned(),
            },
        };
        assert_eq!(ContinueToken::decode(&token.encode()), Some(token));
        assert_eq!(ContinueToken::decode("zz"), None);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("metadata.name%3Dn1"), "metadata.name=n1");
        assert_eq!(percent_decode("a+in+%28x%2Cy%29"), "a in (x,y)");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
