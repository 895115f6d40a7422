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
//!
//! Every file has a parse [`Budget`]: its size, its number of objects (documents plus list
//! items) and the YAML alias replays of the whole file are bounded, so a huge or hostile file
//! costs a bounded time and memory and gives one error, not one per document.

use std::{
    cell::Cell,
    fmt, fs,
    io::Read as _,
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
    /// Drops the room for growth (what a file defines is kept for as long as the file exists:
    /// a vector grown by pushes has room for four objects where a file usually holds one).
    pub fn shrink_to_fit(&mut self) {
        self.snapshot.services.shrink_to_fit();
        self.snapshot.slices.shrink_to_fit();
        self.snapshot.nodes.shrink_to_fit();
        self.pods.shrink_to_fit();
        self.skipped.shrink_to_fit();
        self.errors.shrink_to_fit();
    }

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

/// What parsing one file may cost. A file over budget is used not at all: it gives one error
/// naming the limit (and a file that was good before keeps what it last defined, see
/// `source::dir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The largest file read, in bytes.
    pub max_bytes: u64,
    /// The most objects in a file: documents, plus the items of list documents.
    pub max_objects: usize,
    /// The most YAML events replayed by aliases (`*name`) in the whole file, all documents
    /// together (an alias bomb is many small documents as often as one big one).
    pub max_alias_replay: usize,
}

impl Budget {
    /// 256 MiB, 500,000 objects, 100,000 replayed events. A file of 100,000 Services with
    /// their `EndpointSlice`s is about 70 MiB and 200,000 documents; Kubernetes manifests
    /// rarely use aliases at all.
    pub const DEFAULT: Self = Self {
        max_bytes: 256 << 20,
        max_objects: 500_000,
        max_alias_replay: 100_000,
    };
}

impl Default for Budget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The alias replays one document may use at most, whatever is left of its file's budget:
/// far more than merge keys in a real manifest need.
const DOCUMENT_ALIAS_REPLAY: usize = 10_000;

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
        loaded.extend(load_file(&file, &Budget::DEFAULT));
    }
    Ok(loaded)
}

/// Reads and parses one file (see [`parse_str`]); an unreadable file, or one larger than
/// `budget` allows (not read at all), is reported in [`Loaded::errors`].
#[must_use]
pub fn load_file(path: &Path, budget: &Budget) -> Loaded {
    let whole_file = |message: String| Loaded {
        errors: vec![DocumentError {
            origin: file_origin(path),
            message,
        }],
        ..Loaded::default()
    };
    match read_bounded(path, budget.max_bytes) {
        Ok(Some(text)) => parse_str_with(&text, path, budget),
        Ok(None) => whole_file(format!(
            "the file is larger than {} bytes (the parse budget): not used",
            budget.max_bytes
        )),
        Err(e) => whole_file(format!("cannot read the file: {e}")),
    }
}

/// The text of `path`, or `None` when it holds more than `max_bytes` (only that much is read).
fn read_bounded(path: &Path, max_bytes: u64) -> std::io::Result<Option<String>> {
    let file = fs::File::open(path)?;
    let mut text = String::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_string(&mut text)?;
    Ok((text.len() as u64 <= max_bytes).then_some(text))
}

/// The origin of an error about a whole file.
fn file_origin(file: &Path) -> Origin {
    Origin {
        file: file.to_owned(),
        document: None,
        line: None,
        item: None,
    }
}

/// Parses the text of a file named `file` with the default [`Budget`] (see
/// [`parse_str_with`]).
#[must_use]
pub fn parse_str(text: &str, file: &Path) -> Loaded {
    parse_str_with(text, file, &Budget::DEFAULT)
}

/// Parses the text of a file named `file`: JSON when the name ends in `.json` (any case),
/// YAML otherwise. `file` is only used for that choice and in errors. A text with more objects
/// than `budget` allows gives one error and nothing else.
#[must_use]
pub fn parse_str_with(text: &str, file: &Path, budget: &Budget) -> Loaded {
    let json = file
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut parse = Parse {
        loaded: Loaded::default(),
        objects_left: budget.max_objects,
        replay_left: budget.max_alias_replay,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let within = if json {
        parse_json(text, file, &mut parse)
    } else {
        parse_yaml(text, file, &mut parse)
    };
    if within {
        parse.loaded
    } else {
        Loaded {
            errors: vec![DocumentError {
                origin: file_origin(file),
                message: format!(
                    "the file holds more than {} objects (documents and list items; the parse \
                     budget): not used",
                    budget.max_objects
                ),
            }],
            ..Loaded::default()
        }
    }
}

/// One file's parse: what it found so far and what is left of its budget.
struct Parse {
    loaded: Loaded,
    /// Objects (documents and list items) the file may still hold.
    objects_left: usize,
    /// Alias replays the file may still use.
    replay_left: usize,
}

impl Parse {
    /// Counts one object; false when the budget is exhausted.
    fn take_object(&mut self) -> bool {
        match self.objects_left.checked_sub(1) {
            Some(left) => {
                self.objects_left = left;
                true
            }
            None => false,
        }
    }
}

/// Parses YAML; false when the file holds more objects than its budget.
fn parse_yaml(text: &str, file: &Path, parse: &mut Parse) -> bool {
    let Some(documents) = yaml_documents(text, parse.objects_left) else {
        return false;
    };
    for (document, yaml) in documents.into_iter().enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document: Some(document),
            line: Some(yaml.content_line),
            item: None,
        };
        if !parse.take_object() {
            return false;
        }
        let value = match yaml.to_value(&mut parse.replay_left) {
            Ok(value) => value,
            Err(message) => {
                parse.loaded.errors.push(DocumentError { origin, message });
                continue;
            }
        };
        if !add_document(&Document::Yaml(&yaml, value), origin, parse) {
            return false;
        }
    }
    true
}

/// Parses JSON; false when the file holds more objects than its budget.
fn parse_json(text: &str, file: &Path, parse: &mut Parse) -> bool {
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
            Some(Ok(value)) => {
                if !parse.take_object() || !add_document(&Document::Json(value), origin, parse) {
                    return false;
                }
            }
            Some(Err(e)) => {
                // The stream cannot resynchronise after a syntax error: stop this file.
                parse.loaded.errors.push(DocumentError {
                    origin,
                    message: e.to_string(),
                });
                break;
            }
        }
    }
    true
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

thread_local! {
    /// The alias events (`*name`) of the last YAML document parsed on this thread, from the
    /// parser's budget report (a plain `fn` callback, hence a thread-local).
    static LAST_ALIASES: Cell<usize> = const { Cell::new(0) };
}

fn record_aliases(report: &serde_saphyr::budget::BudgetReport) {
    LAST_ALIASES.with(|c| c.set(report.aliases));
}

impl YamlDocument {
    /// The parser's options for this document, allowing at most `replay` alias replays.
    fn options(replay: usize) -> serde_saphyr::Options {
        serde_saphyr::Options {
            with_snippet: false,
            budget_report: Some(record_aliases),
            alias_limits: serde_saphyr::options::AliasLimits {
                max_total_replayed_events: replay,
                ..serde_saphyr::options::AliasLimits::default()
            },
            ..serde_saphyr::Options::default()
        }
    }

    /// Parses the document once, into a JSON value (as `kubectl` turns YAML into JSON), taking
    /// its alias replays from `replay_left`, the file's budget.
    ///
    /// What a document replays is not reported; it is bounded by what it produced: a replayed
    /// event is a node of the value or the end of one, so a document that uses aliases is
    /// charged twice its value's nodes (at least what it replayed). The file's total is then
    /// at most its budget plus one document's allowance.
    fn to_value(&self, replay_left: &mut usize) -> Result<serde_json::Value, String> {
        LAST_ALIASES.with(|c| c.set(0));
        let allowed = DOCUMENT_ALIAS_REPLAY.min(*replay_left);
        let result = self.decode_with::<serde_json::Value>(allowed);
        if LAST_ALIASES.with(Cell::get) > 0 {
            let charge = match &result {
                Ok(value) => nodes(value).saturating_mul(2),
                Err(_) => allowed,
            };
            *replay_left = replay_left.saturating_sub(charge.max(1));
        }
        result
    }

    /// Decodes the document as `T` (used again only to give a typed error its position in the
    /// file; the value already parsed once within the budget).
    fn decode_with<T: DeserializeOwned>(&self, replay: usize) -> Result<T, String> {
        serde_saphyr::from_str_with_options(&self.text, Self::options(replay)).map_err(|e| {
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

/// The nodes of a JSON value (scalars, arrays and objects), counted without recursion.
fn nodes(value: &serde_json::Value) -> usize {
    let mut count = 0_usize;
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        count = count.saturating_add(1);
        match v {
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(fields) => stack.extend(fields.values()),
            _ => {}
        }
    }
    count
}

/// Splits a YAML stream into its documents, dropping those holding only blank lines,
/// comments and directives; `None` as soon as it has more than `max` documents (counting
/// empty ones: the split stops there, whatever the file's size).
///
/// A line starting with `---` (followed by nothing or white space) starts a document and one
/// that is `...` ends one: YAML forbids both in content at the start of a line, so this split
/// is exact.
fn yaml_documents(text: &str, max: usize) -> Option<Vec<YamlDocument>> {
    // What follows `marker` at the start of `line`, if `line` is that marker.
    let after_marker = |line: &str, marker: &str| -> Option<String> {
        line.strip_prefix(marker)
            .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
            .map(str::to_owned)
    };
    // (index of the chunk's first line, its lines)
    let mut chunks: Vec<(usize, Vec<String>)> = vec![(0, Vec::new())];
    for (index, line) in text.lines().enumerate() {
        // One more chunk than documents allowed: the first may be empty (a leading `---`).
        if chunks.len() > max.saturating_add(1) {
            return None;
        }
        if let Some(rest) = after_marker(line, "---") {
            // Keep what follows the marker (a comment, a flow collection) in its column.
            chunks.push((index, vec![format!("   {rest}")]));
        } else if after_marker(line, "...").is_some() {
            chunks.push((index + 1, Vec::new()));
        } else if let Some((_, lines)) = chunks.last_mut() {
            lines.push(line.to_owned());
        }
    }
    let documents = chunks
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
        .collect();
    Some(documents)
}

/// One document, before its kind is known.
enum Document<'a> {
    /// A YAML document and its value.
    Yaml(&'a YamlDocument, serde_json::Value),
    /// A parsed JSON value (a JSON document, or an item of a YAML or JSON list).
    Json(serde_json::Value),
}

impl Document<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self {
            Self::Yaml(yaml, value) => T::deserialize(value).map_err(|e| {
                // The value has no positions; the YAML text gives the same error with its
                // line (parsed again only for a bad document, with one document's alias
                // allowance).
                match yaml.decode_with::<T>(DOCUMENT_ALIAS_REPLAY) {
                    Err(positioned) => positioned,
                    Ok(_) => e.to_string(),
                }
            }),
            Self::Json(value) => T::deserialize(value).map_err(|e| e.to_string()),
        }
    }

    /// Why a document that is no mapping is no object: the YAML parser's positioned error when
    /// it gives one.
    fn not_a_mapping(&self) -> String {
        let plain = "not a Kubernetes object: expected a mapping with apiVersion and kind";
        match self {
            Self::Yaml(yaml, _) => yaml
                .decode_with::<serde_json::Map<String, serde_json::Value>>(DOCUMENT_ALIAS_REPLAY)
                .err()
                .unwrap_or_else(|| plain.to_owned()),
            Self::Json(_) => plain.to_owned(),
        }
    }

    /// The document's value.
    fn value(&self) -> &serde_json::Value {
        match self {
            Self::Yaml(_, value) | Self::Json(value) => value,
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

/// Adds the object(s) of one document (or list item) to the parse; false when a list holds
/// more items than the file's budget has left.
fn add_document(document: &Document<'_>, origin: Origin, parse: &mut Parse) -> bool {
    if !document.value().is_object() {
        // (A struct would decode from a sequence's elements: say what is wrong instead.)
        return parse.fail(origin, document.not_a_mapping());
    }
    let meta = match document.decode::<TypeMeta>() {
        Ok(meta) => meta,
        Err(e) => return parse.fail(origin, e),
    };
    let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
        return parse.fail(
            origin,
            "not a Kubernetes object: apiVersion and kind are required".to_owned(),
        );
    };
    let loaded = &mut parse.loaded;
    let decoded = match kind_of(&api_version, &kind) {
        Kind::Service => document
            .decode::<Service>()
            .map(|object| loaded.snapshot.services.push(Arc::new(object.into()))),
        Kind::EndpointSlice => document
            .decode::<EndpointSlice>()
            .map(|object| loaded.snapshot.slices.push(Arc::new(object.into()))),
        Kind::Node => document
            .decode::<Node>()
            .map(|object| loaded.snapshot.nodes.push(Arc::new(object))),
        Kind::Pod => document
            .decode::<Pod>()
            .map(|object| loaded.pods.push(Arc::new(object))),
        Kind::Unsupported(supported) => {
            return parse.fail(
                origin,
                format!("{api_version} {kind} is not supported; use {supported}"),
            );
        }
        Kind::List | Kind::TypedList(..) if origin.item.is_some() => {
            return parse.fail(origin, format!("{api_version} {kind} nested in a list"));
        }
        Kind::List => return add_items(document.value(), &origin, None, parse),
        Kind::TypedList(item_version, item_kind) => {
            return add_items(
                document.value(),
                &origin,
                Some((item_version, item_kind)),
                parse,
            );
        }
        Kind::Other => {
            tracing::debug!(%origin, %api_version, %kind, "skipping an object of a kind svc does not use");
            loaded.skipped.push(Skipped {
                origin,
                api_version,
                kind,
            });
            return true;
        }
    };
    match decoded {
        Ok(()) => true,
        Err(e) => parse.fail(origin, format!("{api_version} {kind}: {e}")),
    }
}

impl Parse {
    /// Records a document that could not be used; the parse goes on.
    fn fail(&mut self, origin: Origin, message: String) -> bool {
        self.loaded.errors.push(DocumentError { origin, message });
        true
    }
}

/// Adds the items of a list document; for a typed list, items without `apiVersion` and
/// `kind` get the list's item kind (the API server omits them). False when the list holds
/// more items than the file's budget has left.
fn add_items(
    list: &serde_json::Value,
    origin: &Origin,
    item_type: Option<(&str, &str)>,
    parse: &mut Parse,
) -> bool {
    let items = match list.get("items") {
        None | Some(serde_json::Value::Null) => return true,
        Some(serde_json::Value::Array(items)) => items,
        Some(_) => {
            return parse.fail(origin.clone(), "items: expected a sequence".to_owned());
        }
    };
    for (index, item) in items.iter().enumerate() {
        if !parse.take_object() {
            return false;
        }
        let mut item = item.clone();
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
        if !add_document(&Document::Json(item), origin, parse) {
            return false;
        }
    }
    true
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
        names(loaded.snapshot.slices.iter().map(|s| &s.name))
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

    /// One document replaying about 1,300 events from aliases: under one document's
    /// allowance, but 200 of them are far over a file's budget.
    fn alias_document(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  labels:\n    a: &a x\n\
             spec:\n  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
             \x20 c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n\
             \x20 d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        )
    }

    #[test]
    fn alias_replays_are_bounded_per_file_not_per_document() {
        let mut docs: Vec<String> = (0..200).map(|i| alias_document(&format!("a{i}"))).collect();
        docs.push("apiVersion: v1\nkind: Service\nmetadata:\n  name: plain\n".to_owned());
        let loaded = parse(&docs.join("---\n"), "bomb.yaml");
        let served = service_names(&loaded);
        // Each document is charged at least what it replayed (twice its value's nodes, about
        // 2,500): the file's 100,000 go after about 40 of them.
        assert!(
            (30..=50).contains(&(served.len() - 1)),
            "{} documents with aliases served",
            served.len() - 1
        );
        assert_eq!(served.last(), Some(&"plain"), "no aliases, no charge");
        assert_eq!(loaded.errors.len(), 201 - served.len());
        for e in &loaded.errors {
            assert!(e.message.contains("alias"), "{e}");
        }
        // One document alone is within its allowance.
        let one = parse(&alias_document("one"), "one.yaml");
        assert_eq!(one.errors, []);
    }

    #[test]
    fn objects_are_bounded_per_file_including_list_items() {
        let budget = Budget {
            max_objects: 10,
            ..Budget::DEFAULT
        };
        let tiny = "apiVersion: v1\nkind: ConfigMap\n---\n".repeat(11);
        let loaded = parse_str_with(&tiny, Path::new("tiny.yaml"), &budget);
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert_eq!(loaded.errors[0].origin.document, None);
        assert!(loaded.errors[0].message.contains("more than 10 objects"));
        assert_eq!(loaded.skipped, [], "nothing of the file is used");
        let ten = "apiVersion: v1\nkind: ConfigMap\n---\n".repeat(10);
        assert_eq!(
            parse_str_with(&ten, Path::new("ten.yaml"), &budget)
                .skipped
                .len(),
            10
        );
        // A list document and its items count.
        let items = (0..10)
            .map(|i| format!("- apiVersion: v1\n  kind: Service\n  metadata:\n    name: s{i}\n"))
            .collect::<Vec<_>>()
            .concat();
        let list = format!("apiVersion: v1\nkind: List\nitems:\n{items}");
        let loaded = parse_str_with(&list, Path::new("list.yaml"), &budget);
        assert!(loaded.errors[0].message.contains("more than 10 objects"));
        assert_eq!(service_names(&loaded), Vec::<&str>::new());
        let json: String = (0..11).map(|_| "{}").collect();
        let loaded = parse_str_with(&json, Path::new("many.json"), &budget);
        assert!(loaded.errors[0].message.contains("more than 10 objects"));
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
        let docs = yaml_documents(
            "a: 1\n---\n\n# c\nb: 2\n--- {c: 3}\n...\n%YAML 1.2\n---\nd: 4\n",
            10,
        )
        .unwrap();
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
