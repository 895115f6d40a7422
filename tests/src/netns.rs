//! Network-namespace topology harness.
