//! The address plan: every address the harness hands out, from `198.18.0.0/15` and
//! `2001:db8::/32` only (see `shared/notes/test-environment.md`).
//!
//! IPv6 addresses mirror the IPv4 host digits (`198.18.1.10` <-> `2001:db8:1::10`) so a
//! packet dump reads the same in both families.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

/// An IPv4 network: base address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Ipv4Cidr {
    /// A network from its base address and prefix length.
    #[must_use]
    pub const fn new(addr: Ipv4Addr, len: u8) -> Self {
        Self { addr, len }
    }

    /// Whether `ip` lies in this network.
    #[must_use]
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }

    /// The address `host` in this network (base + `host`).
    #[must_use]
    pub fn host(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + host)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv6 network: base address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv6Cidr {
    /// The network address (host bits zero).
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub len: u8,
}

impl Ipv6Cidr {
    /// A network from its base address and prefix length.
    #[must_use]
    pub const fn new(addr: Ipv6Addr, len: u8) -> Self {
        Self { addr, len }
    }

    /// Whether `ip` lies in this network.
    #[must_use]
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.len))
            .unwrap_or(0);
        u128::from(ip) & mask == u128::from(self.addr) & mask
    }

    /// The address `host` in this network (base + `host`).
    #[must_use]
    pub fn host(&self, host: u128) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) + host)
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Start of every name (namespace, cgroup, run directory) the harness creates; a run's own
/// prefix is `svct<pid>x<counter>`.
pub const TEST_PREFIX: &str = "svct";

/// Number of emulated nodes in a [`Topology`](super::Topology) (see
/// [`Topology::with_nodes`](super::Topology::with_nodes) for more).
pub const NODE_COUNT: usize = 2;

/// Most emulated nodes a [`Topology`](super::Topology) takes (their underlay addresses `.11` to
/// `.20`, pod CIDRs `198.18.1.0/24` to `198.18.10.0/24`).
pub const MAX_NODES: usize = 10;

/// Most pods one node takes (pods are `.10` up to `.10 + MAX_PODS_PER_NODE - 1`).
pub const MAX_PODS_PER_NODE: u32 = 90;

/// The underlay (the "physical" network between nodes and the external client).
pub const UNDERLAY_V4: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 24);
/// The underlay, IPv6.
pub const UNDERLAY_V6: Ipv6Cidr = Ipv6Cidr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 64);

/// The external client's underlay address.
pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The external client's underlay address, IPv6.
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

/// The underlay's default gateway, a router that silently drops everything it is asked to
/// forward: every node's default route points at it, as a real node's points at its network's
/// router, so traffic nobody translated (a VIP the datapath missed) times out instead of
/// failing at once with "network unreachable".
pub const BLACK_HOLE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The black-hole gateway, IPv6.
pub const BLACK_HOLE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);

/// Range the service VIPs of later tests come from (the harness routes nothing to it).
pub const SERVICE_V4: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(198, 19, 0, 0), 16);
/// Range the IPv6 service VIPs of later tests come from.
pub const SERVICE_V6: Ipv6Cidr =
    Ipv6Cidr::new(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0), 64);

/// Host part of the first pod on a node (`.10` / `::10`).
pub const FIRST_POD_HOST: u32 = 10;

/// The IPv6 host part that reads like the IPv4 one: decimal digits reused as hex digits
/// (`11` -> `0x11`, `100` -> `0x100`).
#[must_use]
pub fn v6_twin(host: u32) -> u128 {
    // Decimal digits are valid hex digits, so this never fails.
    u128::from_str_radix(&host.to_string(), 16).unwrap_or_default()
}

/// Node `index`'s (0-based) underlay address: `198.18.0.11`, `198.18.0.12`, ...
#[must_use]
pub fn node_underlay_v4(index: usize) -> Ipv4Addr {
    UNDERLAY_V4.host(node_host(index))
}

/// Node `index`'s underlay address, IPv6: `2001:db8::11`, `2001:db8::12`, ...
#[must_use]
pub fn node_underlay_v6(index: usize) -> Ipv6Addr {
    UNDERLAY_V6.host(v6_twin(node_host(index)))
}

/// Node `index`'s pod CIDR: `198.18.1.0/24`, `198.18.2.0/24`, ...
#[must_use]
pub fn node_pod_cidr_v4(index: usize) -> Ipv4Cidr {
    Ipv4Cidr::new(Ipv4Addr::new(198, 18, node_octet(index), 0), 24)
}

/// Node `index`'s pod CIDR, IPv6: `2001:db8:1::/64`, `2001:db8:2::/64`, ...
#[must_use]
pub fn node_pod_cidr_v6(index: usize) -> Ipv6Cidr {
    Ipv6Cidr::new(
        Ipv6Addr::new(0x2001, 0xdb8, u16::from(node_octet(index)), 0, 0, 0, 0, 0),
        64,
    )
}

/// Address `slot` (0-based) of a pod on node `index`: `.10`, `.11`, ... of the pod CIDR.
#[must_use]
pub fn pod_v4(index: usize, slot: u32) -> Ipv4Addr {
    node_pod_cidr_v4(index).host(FIRST_POD_HOST + slot)
}

/// Address `slot` (0-based) of a pod on node `index`, IPv6: `::10`, `::11`, ...
#[must_use]
pub fn pod_v6(index: usize, slot: u32) -> Ipv6Addr {
    node_pod_cidr_v6(index).host(v6_twin(FIRST_POD_HOST + slot))
}

fn node_host(index: usize) -> u32 {
    11 + u32::try_from(index).unwrap_or(u32::MAX - 11)
}

fn node_octet(index: usize) -> u8 {
    u8::try_from(index + 1).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_the_documented_addresses() {
        assert_eq!(node_underlay_v4(0).to_string(), "198.18.0.11");
        assert_eq!(node_underlay_v6(1).to_string(), "2001:db8::12");
        assert_eq!(node_pod_cidr_v4(1).to_string(), "198.18.2.0/24");
        assert_eq!(node_pod_cidr_v6(0).to_string(), "2001:db8:1::/64");
        assert_eq!(pod_v4(0, 1).to_string(), "198.18.1.11");
        assert_eq!(pod_v6(1, 0).to_string(), "2001:db8:2::10");
        assert_eq!(EXTERNAL_V6.to_string(), "2001:db8::100");
        assert!(SERVICE_V4.contains("198.19.200.1".parse().unwrap()));
        assert!(!SERVICE_V4.contains("198.18.0.1".parse().unwrap()));
        assert!(SERVICE_V6.contains("2001:db8:f::1".parse().unwrap()));
    }

    #[test]
    fn every_address_is_in_the_allowed_ranges() {
        let v4 = Ipv4Cidr::new(Ipv4Addr::new(198, 18, 0, 0), 15);
        let v6 = Ipv6Cidr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32);
        for n in 0..MAX_NODES {
            assert!(v4.contains(node_underlay_v4(n)));
            assert!(v6.contains(node_underlay_v6(n)));
            for slot in 0..MAX_PODS_PER_NODE {
                assert!(node_pod_cidr_v4(n).contains(pod_v4(n, slot)));
                assert!(v4.contains(pod_v4(n, slot)));
                assert!(node_pod_cidr_v6(n).contains(pod_v6(n, slot)));
                assert!(v6.contains(pod_v6(n, slot)));
            }
        }
        assert!(v4.contains(SERVICE_V4.addr) && v6.contains(SERVICE_V6.addr));
        // The most nodes still leave the external client and the black hole their addresses,
        // and their pod CIDRs stay clear of the underlay and the service range.
        let last = node_underlay_v4(MAX_NODES - 1);
        assert!(last < EXTERNAL_V4 && last < BLACK_HOLE_V4, "{last}");
        for n in 0..MAX_NODES {
            let cidr = node_pod_cidr_v4(n);
            assert!(!UNDERLAY_V4.contains(cidr.addr) && !SERVICE_V4.contains(cidr.addr));
        }
    }
}
