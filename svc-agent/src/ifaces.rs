//! Following pod-facing interfaces as they appear and disappear (netlink link events).
