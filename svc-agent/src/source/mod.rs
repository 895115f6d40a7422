//! Where Kubernetes objects come from: a directory of YAML/JSON files (standalone mode).
