//! Label and field selectors (`labelSelector=`, `fieldSelector=`), and the filter a list or a
//! watch applies to objects.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{
    kind::Kind,
    store::{Key, Stored},
};

/// An object's labels (those with string values, the only ones a selector sees), sorted by
/// key: extracted once when the object is written, so that selecting is no JSON lookup.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The labels of `object` (`metadata.labels`).
    pub(crate) fn of(object: &Value) -> Self {
        let Some(labels) = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
        else {
            return Self::default();
        };
        let mut pairs: Vec<(Box<str>, Box<str>)> = labels
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().into(), v.as_str()?.into())))
            .collect();
        pairs.sort_unstable();
        Self(pairs.into_boxed_slice())
    }

    /// The value of label `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }
}

/// One requirement of a label selector.
#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`: also true when the label is absent.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)`: also true when the label is absent.
    NotIn(String, BTreeSet<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    /// Parses the selector syntax of the real API server (`a=b,c!=d,e in (f,g),!h`).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(Self(requirements))
    }

    /// Whether an object with these labels is selected.
    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        let label = |key: &str| labels.get(key);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, set) => label(k).is_some_and(|l| set.contains(l)),
            Requirement::NotIn(k, set) => !label(k).is_some_and(|l| set.contains(l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        })
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in label selector {text:?}"))?;
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in label selector {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(label_key(key)?));
    }
    if let Some((key, value)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(label_key(key)?, label_value(value)?));
    }
    if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(label_key(key)?, label_value(value)?));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let list = part[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("label selector set must end with ')': {part:?}"))?;
        let values = list
            .split(',')
            .map(label_value)
            .collect::<Result<BTreeSet<_>, _>>()?;
        if let Some(key) = head.strip_suffix(" notin") {
            return Ok(Requirement::NotIn(label_key(key)?, values));
        }
        if let Some(key) = head.strip_suffix(" in") {
            return Ok(Requirement::In(label_key(key)?, values));
        }
        return Err(format!("unsupported label selector operator in {part:?}"));
    }
    if part.contains([' ', '<', '>']) {
        return Err(format!("unsupported label selector requirement {part:?}"));
    }
    Ok(Requirement::Exists(label_key(part)?))
}

fn label_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn label_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

/// A parsed `fieldSelector`: every term must hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `field=value,field!=value`, accepting only the fields the real API server
    /// accepts for `kind`.
    pub(crate) fn parse(text: &str, kind: Kind) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let field = field.trim();
            if !kind.supports_field(field) {
                return Err(format!(
                    "field label not supported: {field} (for {})",
                    kind.plural()
                ));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    /// Whether `object` is selected.
    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (field_value(object, field) == *value) == *equal)
    }
}

/// The value of a selectable field, as the API server renders it for selection.
fn field_value(object: &Value, field: &str) -> String {
    let found = field.split('.').try_fold(object, |v, part| v.get(part));
    match found {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        // An unset boolean selects as "false" (spec.unschedulable), anything else as "".
        _ if field == "spec.unschedulable" => "false".to_owned(),
        _ => String::new(),
    }
}

/// What a list or watch request selects: a kind, maybe one namespace, maybe one name (a
/// watch on a single object's path), and the label and field selectors.
#[derive(Debug)]
pub(crate) struct Filter {
    pub(crate) kind: Kind,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    /// Whether the object stored under `key` may be selected (kind, namespace and name).
    pub(crate) fn covers(&self, key: &Key) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }

    /// The first key this filter may cover: where a list starts.
    pub(crate) fn first_key(&self) -> Key {
        Key {
            kind: self.kind,
            namespace: self.namespace.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
        }
    }

    /// Whether `key`, met going through keys in order from [`first_key`](Self::first_key)
    /// on, is past every key this filter covers (another kind, or another namespace when
    /// it names one): where a list stops.
    pub(crate) fn is_past(&self, key: &Key) -> bool {
        key.kind != self.kind
            || self
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != key.namespace)
    }

    /// Whether `object` (stored under a key this filter covers) passes the selectors.
    pub(crate) fn selects(&self, object: &Stored) -> bool {
        self.labels.matches(&object.labels) && self.fields.matches(&object.value)
    }

    /// Whether the request has selectors (then the list carries no `remainingItemCount`).
    pub(crate) fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors_follow_the_api_server_syntax() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front", "n": 1}}});
        let labels = Labels::of(&obj);
        let sel = |s: &str| LabelSelector::parse(s).unwrap().matches(&labels);
        assert!(sel(""));
        assert!(sel("app=web"));
        assert!(sel("app==web,tier"));
        assert!(sel("app in (web, db),tier notin (back)"));
        assert!(sel("!missing,missing!=x"));
        assert!(!sel("app!=web"));
        assert!(!sel("app notin (web)"));
        assert!(!sel("!app"));
        // A label that is not a string is not seen, as before.
        assert!(sel("!n,n!=1"));
        assert!(!sel("n"));
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("app>1").is_err());
    }

    #[test]
    fn field_selectors_accept_only_supported_fields() {
        let node = json!({"metadata": {"name": "n1"}, "spec": {}});
        let sel = |s: &str| FieldSelector::parse(s, Kind::Node).unwrap().matches(&node);
        assert!(sel("metadata.name=n1"));
        assert!(sel("metadata.name!=n2,spec.unschedulable=false"));
        assert!(!sel("metadata.name==n2"));
        assert!(FieldSelector::parse("metadata.namespace=x", Kind::Node).is_err());
        assert!(FieldSelector::parse("spec.type=ClusterIP", Kind::Service).is_ok());
        assert!(FieldSelector::parse("status.phase=Running", Kind::Service).is_err());
    }
}
