//! Where Kubernetes objects come from: a directory of YAML/JSON files (standalone mode) or the
//! Kubernetes API server.

pub mod audit;
pub mod dir;
pub mod files;
pub mod kube;

pub use files::{
    Budget, DocumentError, Loaded, Origin, Skipped, load_dir, load_file, parse_str, parse_str_with,
};
