//! Desired-state model: Kubernetes objects in, frontends and backends out (pure functions).
