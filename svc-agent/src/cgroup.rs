//! Attaching the connect-time programs to a cgroup v2 hierarchy.
