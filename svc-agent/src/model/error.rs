//! Per-object validation errors.

use std::fmt;

/// A field of a Kubernetes object the model could not use; the object (or, for a bad
/// endpoint, just that endpoint) was skipped.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectError {
    /// The object's kind: `"Service"`, `"EndpointSlice"` or `"Node"`.
    pub kind: &'static str,
    /// The object's namespace (empty for cluster-scoped objects such as Nodes).
    pub namespace: String,
    /// The object's name (empty when the object has none).
    pub name: String,
    /// The path of the bad field, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong with it, including the bad value.
    pub reason: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        if self.namespace.is_empty() {
            write!(f, "{} {name}: {}: {}", self.kind, self.field, self.reason)
        } else {
            write!(
                f,
                "{} {}/{name}: {}: {}",
                self.kind, self.namespace, self.field, self.reason
            )
        }
    }
}

impl std::error::Error for ObjectError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_object_field_and_reason() {
        let e = ObjectError {
            kind: "Service",
            namespace: "default".into(),
            name: "web".into(),
            field: "spec.ports[1].port".into(),
            reason: "70000 is not in 1..=65535".into(),
        };
        assert_eq!(
            e.to_string(),
            "Service default/web: spec.ports[1].port: 70000 is not in 1..=65535"
        );
        let node = ObjectError {
            kind: "Node",
            namespace: String::new(),
            name: "node1".into(),
            field: "status.addresses[0].address".into(),
            reason: "bad".into(),
        };
        assert_eq!(
            node.to_string(),
            "Node node1: status.addresses[0].address: bad"
        );
        let unnamed = ObjectError {
            name: String::new(),
            ..e
        };
        assert!(
            unnamed
                .to_string()
                .starts_with("Service default/<unnamed>: ")
        );
    }
}
