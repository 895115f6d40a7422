//! Where Kubernetes objects come from: a directory of YAML/JSON files (standalone mode).

pub mod files;

pub use files::{DocumentError, Loaded, Origin, Skipped, load_dir, load_file, parse_str};
