//! Loading Kubernetes objects from a directory of YAML and JSON files.
//!
//! Accepted: `*.yaml`, `*.yml` (one or more documents separated by `---`) and `*.json` (one or
//! more concatenated JSON objects), in `kubectl get -o yaml|json` or `kubectl apply -f` shape.
//! A document is a single object, or a `v1` `List` (`kubectl get -o yaml` of several
//! objects) or a typed list (`ServiceList`, `EndpointSliceList`, `NodeList`, as the API
//! returns them) with the objects in `items`. `v1` Services, `discovery.k8s.io/v1`
//! `EndpointSlice`s, `v1` Nodes and `v1` Pods (whose endpoints standalone mode computes for
//! Services with a selector, `model::slices_from_pods`) are kept; any other kind (a
//! Deployment in the same file, documentation only; a Knative `Service` of another API group,
//! ...) is skipped and listed in [`Loaded::skipped`].
//!
//! A bad document (YAML or JSON syntax, a field of the wrong type) is reported with its file,
//! document index and line, and does not stop the other documents (except in a JSON file,
//! where the parser cannot find the next object after a syntax error).

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{Deserialize, de::DeserializeOwned};

use crate::model::Snapshot;

/// The objects found in one or more files, with what was skipped and what failed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    /// The Services, `EndpointSlice`s and Nodes, in file and document order.
    pub snapshot: Snapshot,
    /// The Pods, in file and document order (not part of [`Snapshot`]: only standalone mode
    /// uses them, to compute the slices of Services with a selector).
    pub pods: Vec<Arc<Pod>>,
    /// Objects of other kinds, skipped.
    pub skipped: Vec<Skipped>,
    /// Documents (or files) that could not be used.
    pub errors: Vec<DocumentError>,
}

impl Loaded {
    /// Appends everything `other` found after what `self` found.
    pub fn extend(&mut self, other: Loaded) {
        self.snapshot.services.extend(other.snapshot.services);
        self.snapshot.slices.extend(other.snapshot.slices);
        self.snapshot.nodes.extend(other.snapshot.nodes);
        self.pods.extend(other.pods);
        self.skipped.extend(other.skipped);
        self.errors.extend(other.errors);
    }
}

/// Where in a file an object or an error is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// Index of the document in the file, counting from 0 and only documents that are not
    /// empty; `None` for an error about the whole file (unreadable, not UTF-8).
    pub document: Option<usize>,
    /// The line (from 1) where the document starts, when known.
    pub line: Option<usize>,
    /// Index in the list's `items` when the document is a list.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        Ok(())
    }
}

/// A document (or list item, or file) that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentError {
    /// Where it is.
    pub origin: Origin,
    /// Why it could not be used (the parser's error, with its position).
    pub message: String,
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

impl std::error::Error for DocumentError {}

/// An object of a kind the agent does not use.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    /// Where it is.
    pub origin: Origin,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `kind`.
    pub kind: String,
}

/// Whether `path` names a file the loader reads: `*.yaml`, `*.yml` or `*.json` (any case),
/// not hidden (a leading `.`, like the `..data` entries of a mounted `ConfigMap`).
#[must_use]
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

/// Loads every manifest file (see [`is_manifest`]) directly in `dir`, in file name order;
/// subdirectories are not read.
///
/// Fails only when `dir` cannot be listed; a file that cannot be read is reported in
/// [`Loaded::errors`] like a bad document.
pub fn load_dir(dir: &Path) -> anyhow::Result<Loaded> {
    let entries =
        fs::read_dir(dir).with_context(|| format!("listing directory {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing directory {}", dir.display()))?;
        let path = entry.path();
        // `fs::metadata` follows symbolic links (`ConfigMap` volumes are made of them).
        if is_manifest(&path) && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    let mut loaded = Loaded::default();
    for file in files {
        loaded.extend(load_file(&file));
    }
    Ok(loaded)
}

/// Reads and parses one file (see [`parse_str`]); an unreadable file is reported in
/// [`Loaded::errors`].
#[must_use]
pub fn load_file(path: &Path) -> Loaded {
    match fs::read_to_string(path) {
        Ok(text) => parse_str(&text, path),
        Err(e) => Loaded {
            errors: vec![DocumentError {
                origin: Origin {
                    file: path.to_owned(),
                    document: None,
                    line: None,
                    item: None,
                },
                message: format!("cannot read the file: {e}"),
            }],
            ..Loaded::default()
        },
    }
}

/// Parses the text of a file named `file`: JSON when the name ends in `.json` (any case),
/// YAML otherwise. `file` is only used for that choice and in errors.
#[must_use]
pub fn parse_str(text: &str, file: &Path) -> Loaded {
    let json = file
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut loaded = Loaded::default();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if json {
        parse_json(text, file, &mut loaded);
    } else {
        parse_yaml(text, file, &mut loaded);
    }
    loaded
}

fn parse_yaml(text: &str, file: &Path, loaded: &mut Loaded) {
    for (document, yaml) in yaml_documents(text).into_iter().enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document: Some(document),
            line: Some(yaml.content_line),
            item: None,
        };
        add_document(&Document::Yaml(&yaml), origin, loaded);
    }
}

fn parse_json(text: &str, file: &Path, loaded: &mut Loaded) {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for document in 0.. {
        let rest = text.get(stream.byte_offset()..).unwrap_or_default();
        let start = text.len() - rest.trim_start().len();
        let origin = Origin {
            file: file.to_owned(),
            document: Some(document),
            line: Some(line_of(text, start)),
            item: None,
        };
        match stream.next() {
            None => break,
            Some(Ok(value)) => add_document(&Document::Json(value), origin, loaded),
            Some(Err(e)) => {
                // The stream cannot resynchronise after a syntax error: stop this file.
                loaded.errors.push(DocumentError {
                    origin,
                    message: e.to_string(),
                });
                break;
            }
        }
    }
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// One YAML document of a file.
#[derive(Debug, PartialEq, Eq)]
struct YamlDocument {
    /// Its text.
    text: String,
    /// How many lines of the file come before its text.
    lines_before: usize,
    /// The line (from 1) of the file where its content starts (after comments).
    content_line: usize,
}

impl YamlDocument {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        let options = serde_saphyr::Options {
            with_snippet: false,
            ..serde_saphyr::Options::default()
        };
        serde_saphyr::from_str_with_options(&self.text, options).map_err(|e| {
            let message = e.to_string();
            // Make the parser's position (in the document) a position in the file.
            let Some(at) = e.location() else {
                return message;
            };
            let (line, column) = (at.line(), at.column());
            match message.strip_suffix(&format!(" at line {line}, column {column}")) {
                Some(what) => {
                    let line = line.saturating_add(self.lines_before as u64);
                    format!("{what} at line {line}, column {column}")
                }
                None => message,
            }
        })
    }
}

/// Splits a YAML stream into its documents, dropping those holding only blank lines,
/// comments and directives.
///
/// A line starting with `---` (followed by nothing or white space) starts a document and one
/// that is `...` ends one: YAML forbids both in content at the start of a line, so this split
/// is exact.
fn yaml_documents(text: &str) -> Vec<YamlDocument> {
    // What follows `marker` at the start of `line`, if `line` is that marker.
    let after_marker = |line: &str, marker: &str| -> Option<String> {
        line.strip_prefix(marker)
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
            .map(str::to_owned)
    };
    // (index of the chunk's first line, its lines)
    let mut chunks: Vec<(usize, Vec<String>)> = vec![(0, Vec::new())];
    for (index, line) in text.lines().enumerate() {
        if let Some(rest) = after_marker(line, "---") {
            // Keep what follows the marker (a comment, a flow collection) in its column.
            chunks.push((index, vec![format!("   {rest}")]));
        } else if after_marker(line, "...").is_some() {
            chunks.push((index + 1, Vec::new()));
        } else if let Some((_, lines)) = chunks.last_mut() {
            lines.push(line.to_owned());
        }
    }
    chunks
        .into_iter()
        .filter_map(|(lines_before, lines)| {
            let first_content = lines.iter().position(|line| {
                let trimmed = line.trim_start();
                !trimmed.is_empty() && !trimmed.starts_with('#') && !line.starts_with('%')
            })?;
            let mut text = lines.join("\n");
            text.push('\n');
            Some(YamlDocument {
                text,
                lines_before,
                content_line: lines_before + first_content + 1,
            })
        })
        .collect()
}

/// One document, before its kind is known.
enum Document<'a> {
    /// A YAML document.
    Yaml(&'a YamlDocument),
    /// A parsed JSON value (a JSON document, or an item of a YAML or JSON list).
    Json(serde_json::Value),
}

impl Document<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self {
            Self::Yaml(yaml) => yaml.decode(),
            Self::Json(value) => T::deserialize(value).map_err(|e| e.to_string()),
        }
    }
}

/// `apiVersion` and `kind`, the only fields read before dispatching.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// The items of a list.
#[derive(Deserialize)]
struct ListItems {
    items: Option<Vec<serde_json::Value>>,
}

/// What a document holds, by `apiVersion` and `kind`.
enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    /// `v1` `List`: items of any kind, each with its own `apiVersion` and `kind`.
    List,
    /// A typed list: items of one kind, which may omit `apiVersion` and `kind`.
    TypedList(&'static str, &'static str),
    /// A kind the agent does not use.
    Other,
    /// A kind the agent uses, in an API version it does not read.
    Unsupported(&'static str),
}

fn kind_of(api_version: &str, kind: &str) -> Kind {
    match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Node") => Kind::Node,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "List") => Kind::List,
        ("v1", "ServiceList") => Kind::TypedList("v1", "Service"),
        ("discovery.k8s.io/v1", "EndpointSliceList") => {
            Kind::TypedList("discovery.k8s.io/v1", "EndpointSlice")
        }
        ("v1", "NodeList") => Kind::TypedList("v1", "Node"),
        ("v1", "PodList") => Kind::TypedList("v1", "Pod"),
        (group_version, "EndpointSlice" | "EndpointSliceList")
            if group_version.starts_with("discovery.k8s.io/") =>
        {
            Kind::Unsupported("discovery.k8s.io/v1")
        }
        _ => Kind::Other,
    }
}

/// Adds the object(s) of one document (or list item) to `loaded`.
fn add_document(document: &Document<'_>, origin: Origin, loaded: &mut Loaded) {
    let mut fail = |origin: Origin, message: String| {
        loaded.errors.push(DocumentError { origin, message });
    };
    let meta = match document.decode::<TypeMeta>() {
        Ok(meta) => meta,
        Err(e) => return fail(origin, e),
    };
    let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
        return fail(
            origin,
            "not a Kubernetes object: apiVersion and kind are required".to_owned(),
        );
    };
    match kind_of(&api_version, &kind) {
        Kind::Service => match document.decode::<Service>() {
            Ok(object) => loaded.snapshot.services.push(Arc::new(object)),
            Err(e) => fail(origin, format!("{api_version} {kind}: {e}")),
        },
        Kind::EndpointSlice => match document.decode::<EndpointSlice>() {
            Ok(object) => loaded.snapshot.slices.push(Arc::new(object)),
            Err(e) => fail(origin, format!("{api_version} {kind}: {e}")),
        },
        Kind::Node => match document.decode::<Node>() {
            Ok(object) => loaded.snapshot.nodes.push(Arc::new(object)),
            Err(e) => fail(origin, format!("{api_version} {kind}: {e}")),
        },
        Kind::Pod => match document.decode::<Pod>() {
            Ok(object) => loaded.pods.push(Arc::new(object)),
            Err(e) => fail(origin, format!("{api_version} {kind}: {e}")),
        },
        Kind::Unsupported(supported) => fail(
            origin,
            format!("{api_version} {kind} is not supported; use {supported}"),
        ),
        Kind::List | Kind::TypedList(..) if origin.item.is_some() => {
            fail(origin, format!("{api_version} {kind} nested in a list"));
        }
        Kind::List => add_items(document, origin, None, loaded),
        Kind::TypedList(item_version, item_kind) => {
            add_items(document, origin, Some((item_version, item_kind)), loaded);
        }
        Kind::Other => {
            tracing::debug!(%origin, %api_version, %kind, "skipping an object of a kind svc does not use");
            loaded.skipped.push(Skipped {
                origin,
                api_version,
                kind,
            });
        }
    }
}

/// Adds the items of a list document; for a typed list, items without `apiVersion` and
/// `kind` get the list's item kind (the API server omits them).
fn add_items(
    document: &Document<'_>,
    origin: Origin,
    item_type: Option<(&str, &str)>,
    loaded: &mut Loaded,
) {
    let items = match document.decode::<ListItems>() {
        Ok(list) => list.items.unwrap_or_default(),
        Err(e) => {
            loaded.errors.push(DocumentError { origin, message: e });
            return;
        }
    };
    for (index, mut item) in items.into_iter().enumerate() {
        if let (Some((api_version, kind)), Some(object)) = (item_type, item.as_object_mut()) {
            object
                .entry("apiVersion")
                .or_insert_with(|| api_version.into());
            object.entry("kind").or_insert_with(|| kind.into());
        }
        let origin = Origin {
            item: Some(index),
            ..origin.clone()
        };
        add_document(&Document::Json(item), origin, loaded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, FrontendKey, Protocol, Scope};

    /// The documentation example, as one would write it for the standalone mode.
    const FRONTEND: &str = r#"# The frontend Service and its endpoints.
apiVersion: v1
kind: Service
metadata:
  name: frontend-svc
  namespace: default
spec:
  clusterIP: 198.19.0.10
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 5000
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: frontend-svc-abc12
  namespace: default
  labels:
    kubernetes.io/service-name: frontend-svc
addressType: IPv4
ports:
- name: http
  port: 5000
  protocol: TCP
endpoints:
- addresses:
  - "198.18.1.10"
  conditions:
    ready: true
  nodeName: node1
- addresses:
  - "198.18.1.11"
  conditions:
    ready: true
  nodeName: node1
- addresses:
  - "198.18.2.10"
  conditions:
    ready: true
  nodeName: node2
"#;

    fn parse(text: &str, file: &str) -> Loaded {
        parse_str(text, Path::new(file))
    }

    fn names<'a>(names: impl Iterator<Item = &'a Option<String>>) -> Vec<&'a str> {
        names.map(|n| n.as_deref().unwrap_or("?")).collect()
    }

    fn service_names(loaded: &Loaded) -> Vec<&str> {
        names(loaded.snapshot.services.iter().map(|s| &s.metadata.name))
    }

    fn slice_names(loaded: &Loaded) -> Vec<&str> {
        names(loaded.snapshot.slices.iter().map(|s| &s.metadata.name))
    }

    fn origin(file: &str, document: usize, line: usize, item: Option<usize>) -> Origin {
        Origin {
            file: file.into(),
            document: Some(document),
            line: Some(line),
            item,
        }
    }

    #[test]
    fn documentation_example_parses_and_computes() {
        let loaded = parse(FRONTEND, "frontend.yaml");
        assert_eq!(loaded.errors, []);
        assert_eq!(loaded.skipped, []);
        assert_eq!(service_names(&loaded), ["frontend-svc"]);
        assert_eq!(slice_names(&loaded), ["frontend-svc-abc12"]);

        let state = model::compute(&loaded.snapshot, "node1");
        assert_eq!(state.errors, []);
        let key = FrontendKey {
            addr: "198.19.0.10".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        };
        let backends: Vec<String> = state.frontends[&key]
            .backends
            .iter()
            .map(|b| format!("{}:{} local={}", b.addr, b.port, b.local))
            .collect();
        assert_eq!(
            backends,
            [
                "198.18.1.10:5000 local=true",
                "198.18.1.11:5000 local=true",
                "198.18.2.10:5000 local=false",
            ]
        );
    }

    #[test]
    fn multi_document_yaml_with_a_deployment_and_empty_documents() {
        let text = r"---
# leading marker, comments and empty documents are fine
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 8080
          name: http
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 198.19.0.80
  ports:
  - name: http
    port: 80
    targetPort: http
--- # a comment on the marker line
apiVersion: v1
kind: Node
metadata:
  name: node1
...
---
";
        let loaded = parse(text, "web.yaml");
        assert_eq!(loaded.errors, []);
        assert_eq!(service_names(&loaded), ["web"]);
        assert_eq!(loaded.snapshot.nodes.len(), 1);
        assert_eq!(
            loaded.skipped,
            [Skipped {
                origin: origin("web.yaml", 0, 4, None),
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
            }]
        );
    }

    #[test]
    fn kubectl_list_is_unpacked() {
        // `kubectl get svc,endpointslices,pods -o yaml`
        let text = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    name: web
    namespace: default
  spec:
    clusterIP: 198.19.0.81
    clusterIPs:
    - 198.19.0.81
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 198.18.1.5
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node1
  kind: EndpointSlice
  metadata:
    labels:
      kubernetes.io/service-name: web
    name: web-x7k2p
    namespace: default
  ports:
  - name: http
    port: 8080
    protocol: TCP
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-0
- apiVersion: v1
  kind: Service
  metadata:
    name: broken
  spec:
    ports: "not a list"
kind: List
metadata:
  resourceVersion: ""
"#;
        let loaded = parse(text, "list.yaml");
        assert_eq!(service_names(&loaded), ["web"]);
        assert_eq!(slice_names(&loaded), ["web-x7k2p"]);
        assert_eq!(loaded.skipped, []);
        assert_eq!(
            names(loaded.pods.iter().map(|p| &p.metadata.name)),
            ["web-0"]
        );
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].origin, origin("list.yaml", 0, 1, Some(3)));
        assert!(
            loaded.errors[0].message.starts_with("v1 Service: "),
            "{}",
            loaded.errors[0]
        );

        let state = model::compute(&loaded.snapshot, "node1");
        assert_eq!(state.frontends.len(), 1);
        assert_eq!(state.frontends.values().next().unwrap().backends.len(), 1);
    }

    #[test]
    fn typed_list_items_get_their_kind() {
        // What `GET /api/v1/services` returns: items without apiVersion and kind.
        let text = r#"{
  "kind": "ServiceList",
  "apiVersion": "v1",
  "metadata": {"resourceVersion": "4242"},
  "items": [
    {"metadata": {"name": "a", "namespace": "default"},
     "spec": {"clusterIP": "198.19.0.1", "ports": [{"port": 443, "targetPort": 6443}]}},
    {"metadata": {"name": "b", "namespace": "default"}, "spec": {"clusterIP": "None"}}
  ]
}"#;
        let loaded = parse(text, "services.json");
        assert_eq!(loaded.errors, []);
        assert_eq!(service_names(&loaded), ["a", "b"]);

        let slices = r"apiVersion: discovery.k8s.io/v1
kind: EndpointSliceList
items:
- metadata:
    name: a-1
  addressType: IPv4
  endpoints: []
";
        assert_eq!(slice_names(&parse(slices, "s.yaml")), ["a-1"]);
    }

    #[test]
    fn json_object_and_stream() {
        let one = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.100.11"}]}}"#;
        let loaded = parse(one, "node.json");
        assert_eq!(loaded.errors, []);
        assert_eq!(loaded.snapshot.nodes.len(), 1);

        let stream = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}
{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}

{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"ports": [{"port": "x"}]}}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c"}}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "d"
"#;
        let loaded = parse(stream, "STREAM.JSON");
        assert_eq!(service_names(&loaded), ["a", "c"]);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].origin, origin("STREAM.JSON", 1, 2, None));
        let origins: Vec<&Origin> = loaded.errors.iter().map(|e| &e.origin).collect();
        assert_eq!(
            origins,
            [
                &origin("STREAM.JSON", 2, 4, None),
                &origin("STREAM.JSON", 4, 6, None)
            ]
        );
        assert!(
            loaded.errors[0].message.contains("invalid type"),
            "{}",
            loaded.errors[0]
        );
    }

    #[test]
    fn broken_documents_are_reported_and_the_others_kept() {
        let text = r"apiVersion: v1
kind: Service
metadata:
  name: first
---
apiVersion: v1
kind: Service
metadata:
  name: bad-yaml
  labels: [unclosed
---
apiVersion: v1
kind: Service
metadata:
  name: bad-type
spec:
  ports:
  - port: eighty
---
metadata:
  name: no-kind
---
- just
- a list
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: old
addressType: IPv4
endpoints: []
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: knative
---
apiVersion: v1
kind: Service
metadata:
  name: last
";
        let loaded = parse(text, "dir/mixed.yml");
        assert_eq!(service_names(&loaded), ["first", "last"]);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].api_version, "serving.knative.dev/v1");
        let origins: Vec<(Option<usize>, Option<usize>)> = loaded
            .errors
            .iter()
            .map(|e| (e.origin.document, e.origin.line))
            .collect();
        assert_eq!(
            origins,
            [
                (Some(1), Some(6)),
                (Some(2), Some(12)),
                (Some(3), Some(20)),
                (Some(4), Some(23)),
                (Some(5), Some(26)),
            ]
        );
        for e in &loaded.errors {
            assert_eq!(e.origin.file, Path::new("dir/mixed.yml"));
        }
        // The parser's positions are the file's, not the document's.
        let bad_type = &loaded.errors[1];
        assert!(bad_type.message.starts_with("v1 Service: "), "{bad_type}");
        assert!(bad_type.message.contains("line 18"), "{bad_type}");
        assert!(
            loaded.errors[0]
                .to_string()
                .starts_with("dir/mixed.yml: document 1 (line 6): "),
            "{}",
            loaded.errors[0]
        );
        assert_eq!(
            loaded.errors[2].message,
            "not a Kubernetes object: apiVersion and kind are required"
        );
        assert_eq!(
            loaded.errors[4].message,
            "discovery.k8s.io/v1beta1 EndpointSlice is not supported; use discovery.k8s.io/v1"
        );
    }

    #[test]
    fn nested_lists_are_rejected() {
        let text = r"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: List
  items: []
";
        let loaded = parse(text, "nested.yaml");
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].origin.item, Some(0));
    }

    #[test]
    fn crlf_bom_and_document_end_markers() {
        let text = "\u{feff}apiVersion: v1\r\nkind: Service\r\nmetadata:\r\n  name: a\r\n...\r\n\
                    apiVersion: v1\r\nkind: Service\r\nmetadata:\r\n  name: b\r\n";
        let loaded = parse(text, "crlf.yaml");
        assert_eq!(loaded.errors, []);
        assert_eq!(service_names(&loaded), ["a", "b"]);
    }

    #[test]
    fn empty_files_give_nothing() {
        for (text, file) in [
            ("", "a.yaml"),
            ("# nothing\n---\n", "b.yaml"),
            ("", "c.json"),
        ] {
            assert_eq!(parse(text, file), Loaded::default(), "{file}");
        }
    }

    #[test]
    fn yaml_documents_know_their_lines() {
        let docs =
            yaml_documents("a: 1\n---\n\n# c\nb: 2\n--- {c: 3}\n...\n%YAML 1.2\n---\nd: 4\n");
        let lines: Vec<(usize, usize)> = docs
            .iter()
            .map(|d| (d.lines_before, d.content_line))
            .collect();
        assert_eq!(lines, [(0, 1), (1, 5), (5, 6), (8, 10)]);
        assert_eq!(docs[1].text, "   \n\n# c\nb: 2\n");
        assert_eq!(docs[2].text, "    {c: 3}\n");
        assert_eq!(docs[3].text, "   \nd: 4\n");
    }

    #[test]
    fn manifest_file_names() {
        for yes in ["a.yaml", "b.yml", "c.json", "D.YAML", "dir/e.Json"] {
            assert!(is_manifest(Path::new(yes)), "{yes}");
        }
        for no in [
            "a.txt",
            "yaml",
            ".hidden.yaml",
            "..data",
            "a.yaml.bak",
            "a.yaml~",
        ] {
            assert!(!is_manifest(Path::new(no)), "{no}");
        }
    }

    /// A fresh directory under the system temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("svc-agent-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service_yaml(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n")
    }

    #[test]
    fn load_dir_reads_manifests_in_name_order() {
        let dir = TempDir::new("load-dir");
        let write = |name: &str, text: &[u8]| fs::write(dir.0.join(name), text).unwrap();
        write("b.yaml", service_yaml("from-b").as_bytes());
        write(
            "a.json",
            br#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "from-a"}}"#,
        );
        write(
            "c.yml",
            format!("{}---\n{}", service_yaml("c1"), service_yaml("c2")).as_bytes(),
        );
        write("notes.txt", service_yaml("ignored-txt").as_bytes());
        write(".hidden.yaml", service_yaml("ignored-hidden").as_bytes());
        write("d.yaml", b"\xff\xfe not utf-8");
        fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        fs::write(dir.0.join("sub.yaml/x.yaml"), service_yaml("ignored-sub")).unwrap();

        let loaded = load_dir(&dir.0).unwrap();
        assert_eq!(service_names(&loaded), ["from-a", "from-b", "c1", "c2"]);
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].origin.file, dir.0.join("d.yaml"));
        assert_eq!(loaded.errors[0].origin.document, None);
        assert!(
            loaded.errors[0]
                .message
                .starts_with("cannot read the file: ")
        );
    }

    #[test]
    fn load_dir_fails_only_for_a_missing_directory() {
        let dir = TempDir::new("missing");
        let missing = dir.0.join("nope");
        let e = load_dir(&missing).unwrap_err();
        assert!(format!("{e:#}").contains("listing directory"), "{e:#}");
        assert_eq!(load_dir(&dir.0).unwrap(), Loaded::default());
    }
}
