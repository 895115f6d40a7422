//! The HTTP side of the test API server: routing, `GET` of one object, paginated lists and
//! chunked watch streams, in the wire format of the real API server.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io,
    ops::Bound,
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
    store::{Change, Compacted, Key, Stored, set_resource_version},
};

/// The body of every response.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The largest request body accepted (`POST`/`PATCH` of an Event; with
/// [`Options::writable`](super::Options::writable), `POST`/`PUT` of a Service or an
/// `EndpointSlice`).
const MAX_BODY: usize = 1 << 20;

/// Answers one request, recording it.
pub(crate) async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let params = Params::parse(&query);
    let response = match shared.take_failure() {
        Some(code) => injected_failure(code),
        None if method == Method::POST
            || method == Method::PATCH
            || method == Method::PUT
            || method == Method::DELETE =>
        {
            match read_body(request).await {
                Ok(body) => write_any(shared, &method, &path, &body),
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
        return json_response(StatusCode::OK, object.json.clone());
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
// Writes (Events; Services and EndpointSlices when the server is writable)
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

/// A write: a controller's (see [`write_object`]) when the server is writable and it is one,
/// else an Event's (see [`write`]).
fn write_any(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    if shared.options.writable
        && let Some((kind @ (Kind::Service | Kind::EndpointSlice), Some(namespace), name)) =
            parse_path(path)
    {
        return write_object(shared, method, kind, &namespace, name, body);
    }
    write(shared, method, path, body)
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
    if kind != Kind::Event
        || namespace.is_none()
        || !(*method == Method::POST || *method == Method::PATCH)
    {
        return status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!(
                "the test API server accepts {method} only for namespaced events.k8s.io/v1 Events \
                 (POST, PATCH; and POST, PUT, DELETE for Services and EndpointSlices when \
                 started writable)"
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
            let mut patched = existing.value.clone();
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
            stored.json.clone(),
        ),
        Err((code, reason, message)) => status_response(code, reason, &message),
    }
}

/// A controller's write of a Service or an `EndpointSlice` (only with
/// [`Options::writable`](super::Options::writable)), as the real API server answers it:
/// `POST` to the collection creates (`201`; `409 AlreadyExists` if the name is taken; the name
/// must be given, `generateName` is not served), `PUT` to the object replaces it (`200`; `404`
/// if it does not exist; `409 Conflict` when the body carries a `metadata.resourceVersion`
/// other than the stored one: optimistic concurrency; none: an unconditional update, which the
/// real server allows for these kinds), `DELETE` removes it (`200` with its last state; `404`).
fn write_object(
    shared: &Shared,
    method: &Method,
    kind: Kind,
    namespace: &str,
    name: Option<String>,
    body: &[u8],
) -> Response<Body> {
    let plural = kind.plural();
    let key = |name: &str| Key {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    if *method == Method::DELETE {
        let Some(name) = name else {
            return status_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "DELETE of a whole collection is not served",
            );
        };
        return match shared.change(|store| store.delete(&key(&name))) {
            Some(last) => json_response(StatusCode::OK, last.json.clone()),
            None => status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{plural} \"{name}\" not found"),
            ),
        };
    }
    let creating = *method == Method::POST;
    let (object, object_name, asked_rv) =
        match object_to_write(method, kind, namespace, name.as_deref(), body) {
            Ok(parts) => parts,
            Err(response) => return *response,
        };
    let result = shared.change(|store| {
        let existing = store.objects().get(&key(&object_name)).cloned();
        match (&existing, creating) {
            (Some(_), true) => Err((
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{plural} \"{object_name}\" already exists"),
            )),
            (None, false) => Err((
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{plural} \"{object_name}\" not found"),
            )),
            (Some(existing), false)
                if asked_rv.as_ref().is_some_and(|asked| {
                    existing
                        .value
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        != Some(asked.as_str())
                }) =>
            {
                Err((
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {plural} \"{object_name}\": the object \
                         has been modified; please apply your changes to the latest version and \
                         try again"
                    ),
                ))
            }
            _ => store
                .apply(object)
                .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e)),
        }
    });
    match result {
        Ok(stored) => json_response(
            if creating {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            stored.json.clone(),
        ),
        Err((code, reason, message)) => status_response(code, reason, &message),
    }
}

/// The object a `POST` or `PUT` of [`write_object`] writes, checked against the URL: the
/// object (with `apiVersion`, `kind` and the namespace set), its name, and the
/// `resourceVersion` it asks to replace (none: unconditional).
fn object_to_write(
    method: &Method,
    kind: Kind,
    namespace: &str,
    name: Option<&str>,
    body: &[u8],
) -> Result<(Value, String, Option<String>), Box<Response<Body>>> {
    let creating = *method == Method::POST;
    if *method != Method::PUT && !creating {
        return Err(Box::new(status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!(
                "the test API server does not serve {method} for {}",
                kind.plural()
            ),
        )));
    }
    if creating == name.is_some() {
        return Err(Box::new(status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST goes to the collection, PUT to the object",
        )));
    }
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return Err(Box::new(bad_request("the request body is not JSON")));
    };
    if !object.is_object() {
        return Err(Box::new(bad_request(
            "the request body is not a JSON object",
        )));
    }
    object["apiVersion"] = kind.api_version().into();
    object["kind"] = kind.name().into();
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let object_ns = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str);
    if object_ns.is_some_and(|ns| ns != namespace) {
        return Err(Box::new(bad_request(
            "the namespace of the object does not match the URL",
        )));
    }
    object["metadata"]["namespace"] = namespace.into();
    let object_name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if object_name.is_empty() {
        return Err(Box::new(status_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name is required (generateName is not served)",
        )));
    }
    if name.is_some_and(|n| n != object_name) {
        return Err(Box::new(bad_request(
            "the name of the object does not match the URL",
        )));
    }
    let asked_rv = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|rv| !rv.is_empty())
        .map(str::to_owned);
    Ok((object, object_name, asked_rv))
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
    // A list at resourceVersion=0 is served from the watch cache, which ignores `limit`.
    let limit = if rv_param == "0" { 0 } else { limit };
    // Start after the token's key, or at the first key the filter covers, whichever is later.
    let first = filter.first_key();
    let start = match &token {
        Some(token) if token.after >= first => Bound::Excluded(&token.after),
        _ => Bound::Included(&first),
    };
    let objects = match store.objects_at(at, start) {
        Ok(objects) => objects,
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
    let mut selected = objects
        .take_while(|(key, _)| !filter.is_past(key))
        .filter(|(key, object)| filter.covers(key) && filter.selects(object));
    let mut items: Vec<Arc<Stored>> = Vec::new();
    let mut last = None;
    for (key, object) in selected.by_ref() {
        items.push(Arc::clone(object));
        last = Some(key);
        if limit > 0 && items.len() == limit {
            break;
        }
    }
    // Only a list without selectors says how many items are left; with selectors, whether
    // any is left is all that counts (it gets a continue token).
    let remaining = if filter.has_selectors() {
        usize::from(selected.next().is_some())
    } else {
        selected.by_ref().count()
    };
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
    drop(selected);
    drop(store);
    json_response(StatusCode::OK, list_body(filter.kind, &metadata, &items))
}

/// A list's body: `{"kind":"ServiceList","apiVersion":"v1","metadata":{..},"items":[..]}`,
/// the items being their stored list-item text ([`Stored::item`]). The envelope is
/// serialized as a `Value` holding no items and the items are put between its brackets, so
/// the bytes are those of the whole list serialized as one `Value`, at the cost of a copy.
fn list_body(kind: Kind, metadata: &Value, items: &[Arc<Stored>]) -> Bytes {
    let envelope = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": [],
    })
    .to_string();
    // The only such text: the other fields are a kind name, a version and metadata holding
    // numbers and a hexadecimal token.
    let marker = "\"items\":[";
    let at = envelope
        .find(marker)
        .map_or(envelope.len(), |i| i + marker.len());
    let size = items.iter().map(|o| o.item.len() + 1).sum::<usize>();
    let mut body = Vec::with_capacity(envelope.len() + size);
    body.extend_from_slice(&envelope.as_bytes()[..at]);
    for (i, object) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&object.item);
    }
    body.extend_from_slice(&envelope.as_bytes()[at..]);
    body.into()
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
        let mut initial = Vec::new();
        if send_initial != Some("false") {
            let first = state.filter.first_key();
            initial = store
                .objects()
                .range(&first..)
                .take_while(|(key, _)| !state.filter.is_past(key))
                .filter(|(key, object)| state.filter.covers(key) && state.filter.selects(object))
                .map(|(_, object)| Arc::clone(object))
                .collect();
        }
        state.from = store.rv();
        drop(store);
        state.pending.extend(
            initial
                .iter()
                .map(|object| event_line("ADDED", &object.json)),
        );
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
        (true, true) => Some(event_line("MODIFIED", &change.object.json)),
        (false, true) => Some(event_line("ADDED", &change.object.json)),
        (true, false) if change.deleted => Some(event_line("DELETED", &change.object.json)),
        (true, false) => {
            let mut prev = change
                .prev
                .as_ref()
                .map(|p| p.value.clone())
                .unwrap_or_default();
            set_resource_version(&mut prev, change.rv);
            Some(event_line("DELETED", prev.to_string().as_bytes()))
        }
        (false, false) => None,
    }
}

/// One line of a watch: an event of type `kind` about the object whose JSON text is `object`.
fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let head = format!("{{\"type\":\"{kind}\",\"object\":");
    let mut line = Vec::with_capacity(head.len() + object.len() + 2);
    line.extend_from_slice(head.as_bytes());
    line.extend_from_slice(object);
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
    event_line("BOOKMARK", object.to_string().as_bytes())
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
    use std::collections::BTreeMap;

    use super::{
        super::{Options, selector::Labels},
        *,
    };

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

    /// What a request answers: status and body.
    async fn request(shared: &Arc<Shared>, path_and_query: &str) -> (StatusCode, Vec<u8>) {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let response = route(shared, &Method::GET, path, &Params::parse(query));
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    fn filter_of(path_and_query: &str) -> Filter {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let params = Params::parse(query);
        let (kind, namespace, name) = parse_path(path).unwrap();
        Filter {
            kind,
            namespace,
            name,
            labels: LabelSelector::parse(params.get("labelSelector").unwrap_or_default()).unwrap(),
            fields: FieldSelector::parse(params.get("fieldSelector").unwrap_or_default(), kind)
                .unwrap(),
        }
    }

    /// A page of a list as the server built it before lists were served from stored text: the
    /// whole state at the version (kept by the test after every write), filtered from the
    /// start, each item a `Value` without `apiVersion`/`kind`, and the list serialized as one
    /// `Value`. Also the key of its last item.
    fn reference_page(
        state: &BTreeMap<Key, Value>,
        at: u64,
        filter: &Filter,
        after: Option<&Key>,
        limit: usize,
    ) -> (String, Option<Key>) {
        let mut selected = state
            .iter()
            .filter(|(key, _)| filter.covers(key))
            .filter(|(key, _)| after.is_none_or(|after| *key > after))
            .filter(|(_, object)| {
                let labels = Labels::of(object);
                filter.labels.matches(&labels) && filter.fields.matches(object)
            });
        let mut items = Vec::new();
        let mut last = None;
        for (key, object) in selected.by_ref() {
            // As the server always made list items (`remove`, not `list_item`, so that a
            // change of how stored items are made shows).
            let mut item = object.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            items.push(item);
            last = Some(key.clone());
            if limit > 0 && items.len() == limit {
                break;
            }
        }
        let remaining = selected.count();
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if remaining > 0
            && let Some(after) = &last
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
        (body.to_string(), last)
    }

    /// The test's objects and a record of every state the store has been in.
    struct World {
        shared: Arc<Shared>,
        states: BTreeMap<u64, BTreeMap<Key, Value>>,
        seed: u64,
    }

    impl World {
        fn new(history_limit: usize) -> Self {
            let shared = Arc::new(Shared::new(Options {
                history_limit,
                ..Options::default()
            }));
            let mut world = Self {
                shared,
                states: BTreeMap::new(),
                seed: 7,
            };
            world.keep_state();
            world
        }

        fn keep_state(&mut self) {
            let store = self.shared.store();
            let state = store
                .objects()
                .iter()
                .map(|(k, o)| (k.clone(), o.value.clone()))
                .collect();
            self.states.insert(store.rv(), state);
        }

        fn random(&mut self, below: u64) -> u64 {
            self.seed = self
                .seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.seed >> 33) % below
        }

        /// One write (create, update or delete) of a Service, a slice or a Node.
        fn write(&mut self) {
            let (ns, i, version) = (self.random(3), self.random(12), self.random(4));
            let ns = ["a", "b", "c"][usize::try_from(ns).unwrap()];
            let app = if version % 2 == 0 { "web" } else { "db" };
            let object = match self.random(7) {
                0 => {
                    let key = Key {
                        kind: [Kind::Service, Kind::EndpointSlice][usize::from(version < 2)],
                        namespace: ns.to_owned(),
                        name: format!("o{i}"),
                    };
                    self.shared.change(|store| store.delete(&key));
                    self.keep_state();
                    return;
                }
                // Fields in an order that moves others when apiVersion and kind are removed.
                1 | 2 => json!({"metadata": {"name": format!("o{i}"), "namespace": ns,
                                 "labels": {"app": app, "n": version}},
                    "spec": {"type": if version > 1 { "NodePort" } else { "ClusterIP" }},
                    "apiVersion": "v1", "kind": "Service", "status": {}}),
                3 | 4 => json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("o{i}"), "namespace": ns,
                                 "labels": if version == 3 { json!({"app": app, "tier": "front"}) } else { json!({"app": app}) }},
                    "spec": {"type": "ClusterIP", "clusterIP": format!("10.0.0.{i}")}}),
                5 => json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "addressType": "IPv4", "endpoints": [{"addresses": [format!("10.1.0.{version}")]}],
                    "metadata": {"name": format!("o{i}"), "namespace": ns,
                                 "labels": if version == 0 { json!({}) } else { json!({"kubernetes.io/service-name": format!("s{version}")}) }}}),
                _ => json!({"kind": "Node", "apiVersion": "v1",
                    "metadata": {"name": format!("n{}", i % 4)},
                    "spec": if version == 0 { json!({"unschedulable": true}) } else { json!({}) }}),
            };
            self.shared.change(|store| store.apply(object)).unwrap();
            self.keep_state();
        }
    }

    fn text(body: &[u8]) -> &str {
        std::str::from_utf8(body).unwrap()
    }

    const LISTS: [&str; 12] = [
        "/api/v1/services",
        "/api/v1/namespaces/b/services",
        "/api/v1/services?labelSelector=app%3Dweb",
        "/api/v1/services?labelSelector=%21tier%2Capp+in+%28web%2Cdb%29",
        "/api/v1/services?labelSelector=n",
        "/api/v1/services?fieldSelector=spec.type%3DNodePort",
        "/api/v1/namespaces/c/services?fieldSelector=metadata.name%21%3Do3&labelSelector=app",
        "/apis/discovery.k8s.io/v1/endpointslices?labelSelector=kubernetes.io%2Fservice-name",
        "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices",
        "/api/v1/nodes",
        "/api/v1/nodes?fieldSelector=spec.unschedulable%3Dfalse",
        "/apis/events.k8s.io/v1/events",
    ];

    /// Every page of every list, with writes between pages, is byte for byte what a plain
    /// serialization of the state at the first page's version gives: pages continue after the
    /// token's key at its version, selectors and `remainingItemCount` as before, items without
    /// `apiVersion`/`kind` (and the other fields in the same order as before).
    #[tokio::test]
    async fn list_pages_show_the_state_at_their_version_byte_for_byte() {
        let mut world = World::new(10_000);
        for _ in 0..150 {
            world.write();
        }
        let mut pages = 0;
        for list in LISTS {
            for limit in [0, 1, 3, 500] {
                let sep = if list.contains('?') { '&' } else { '?' };
                let filter = filter_of(list);
                let mut path = format!("{list}{sep}limit={limit}");
                let (mut at, mut after) = (None, None);
                loop {
                    let (status, body) = request(&world.shared, &path).await;
                    assert_eq!(status, StatusCode::OK, "{path}: {}", text(&body));
                    let page: Value = serde_json::from_slice(&body).unwrap();
                    let rv = page["metadata"]["resourceVersion"].as_str().unwrap();
                    let rv: u64 = rv.parse().unwrap();
                    let at = *at.get_or_insert(rv);
                    assert_eq!(rv, at, "{path}: every page shows the first page's version");
                    let (expected, last) =
                        reference_page(&world.states[&at], at, &filter, after.as_ref(), limit);
                    assert_eq!(text(&body), expected, "{path}");
                    for item in page["items"].as_array().unwrap() {
                        assert!(item.get("apiVersion").is_none() && item.get("kind").is_none());
                    }
                    pages += 1;
                    let Some(token) = page["metadata"]["continue"].as_str() else {
                        break;
                    };
                    after = last;
                    path = format!("{list}{sep}limit={limit}&continue={token}");
                    // Writes between pages change neither what the next page shows nor where
                    // it starts.
                    for _ in 0..world.random(4) {
                        world.write();
                    }
                }
            }
        }
        assert!(pages > 200, "{pages} pages");

        // resourceVersion=0 ignores the limit; Exact serves an older version, paginated too.
        let (_, body) = request(&world.shared, "/api/v1/services?resourceVersion=0&limit=1").await;
        let now = world.shared.store().rv();
        let filter = filter_of("/api/v1/services");
        let (expected, _) = reference_page(&world.states[&now], now, &filter, None, 0);
        assert_eq!(text(&body), expected);
        let old = now - 20;
        let path =
            format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact&limit=2");
        let (_, body) = request(&world.shared, &path).await;
        let (expected, _) = reference_page(&world.states[&old], old, &filter, None, 2);
        assert_eq!(text(&body), expected);
    }

    /// A continue token outlived by the history is `410 Expired`; a current one is not.
    #[tokio::test]
    async fn continue_tokens_expire_with_the_history() {
        let mut world = World::new(5);
        for _ in 0..60 {
            world.write();
        }
        let (_, body) = request(&world.shared, "/api/v1/services?limit=1").await;
        let page: Value = serde_json::from_slice(&body).unwrap();
        let token = page["metadata"]["continue"].as_str().unwrap().to_owned();
        let next = format!("/api/v1/services?limit=1&continue={token}");
        for _ in 0..4 {
            world.write();
        }
        assert_eq!(request(&world.shared, &next).await.0, StatusCode::OK);
        for _ in 0..5 {
            world.write();
        }
        let (status, body) = request(&world.shared, &next).await;
        assert_eq!(status, StatusCode::GONE);
        let status: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status["reason"], "Expired");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("continue parameter is too old")
        );
    }

    /// A watch from no version starts with one ADDED event per selected object, as the
    /// object's JSON text, in key order.
    #[tokio::test]
    async fn watches_start_with_the_selected_objects() {
        let mut world = World::new(10_000);
        for _ in 0..150 {
            world.write();
        }
        for list in LISTS {
            let sep = if list.contains('?') { '&' } else { '?' };
            let path = format!("{list}{sep}watch=true&timeoutSeconds=0");
            let (status, body) = request(&world.shared, &path).await;
            assert_eq!(status, StatusCode::OK);
            let filter = filter_of(list);
            let now = world.shared.store().rv();
            let mut expected = String::new();
            for (key, object) in &world.states[&now] {
                let labels = Labels::of(object);
                let selected = filter.labels.matches(&labels) && filter.fields.matches(object);
                if filter.covers(key) && selected {
                    let _ = writeln!(expected, "{{\"type\":\"ADDED\",\"object\":{object}}}");
                }
            }
            assert_eq!(text(&body), expected, "{path}");
        }
    }
}
