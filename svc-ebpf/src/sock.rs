//! Connect-time translation (cgroup sock_addr hooks) for host-network processes.
