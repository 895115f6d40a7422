//! Connect-time translation state (cgroup sock_addr programs): reverse-translation entries per socket.
