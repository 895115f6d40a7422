//! Network-byte-order integers. The wrapped value is stored exactly as it sits in a packet.

/// A 16-bit value in network byte order (big endian), as it sits in a packet header.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Be16(pub u16);

/// A 32-bit value in network byte order (big endian), as it sits in a packet header.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Be32(pub u32);

impl Be16 {
    /// Wraps a host-order value.
    #[must_use]
    pub const fn from_host(v: u16) -> Self {
        Self(v.to_be())
    }
    /// Returns the host-order value.
    #[must_use]
    pub const fn to_host(self) -> u16 {
        u16::from_be(self.0)
    }
}

impl Be32 {
    /// Wraps a host-order value.
    #[must_use]
    pub const fn from_host(v: u32) -> Self {
        Self(v.to_be())
    }
    /// Returns the host-order value.
    #[must_use]
    pub const fn to_host(self) -> u32 {
        u32::from_be(self.0)
    }
    /// Wraps the four octets of an IPv4 address (`[198, 19, 0, 1]`).
    #[must_use]
    pub const fn from_octets(o: [u8; 4]) -> Self {
        Self(u32::from_ne_bytes(o))
    }
    /// Returns the four octets, first octet first.
    #[must_use]
    pub const fn octets(self) -> [u8; 4] {
        self.0.to_ne_bytes()
    }
}

impl core::fmt::Debug for Be16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.to_host())
    }
}

impl core::fmt::Debug for Be32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [o1, o2, o3, o4] = self.octets();
        write!(f, "{o1}.{o2}.{o3}.{o4}")
    }
}

/// `EtherType` of IPv4, in network byte order as read from the frame.
pub const ETH_P_IP: Be16 = Be16::from_host(0x0800);
/// `EtherType` of IPv6, in network byte order as read from the frame.
pub const ETH_P_IPV6: Be16 = Be16::from_host(0x86dd);

/// IP protocol numbers the datapath knows.
pub mod ipproto {
    /// Internet Control Message Protocol.
    pub const ICMP: u8 = 1;
    /// Transmission Control Protocol.
    pub const TCP: u8 = 6;
    /// User Datagram Protocol.
    pub const UDP: u8 = 17;
    /// IPv6 hop-by-hop options extension header.
    pub const HOPOPTS: u8 = 0;
    /// IPv6 routing extension header.
    pub const ROUTING: u8 = 43;
    /// IPv6 fragment extension header.
    pub const FRAGMENT: u8 = 44;
    /// IPv6 destination options extension header.
    pub const DSTOPTS: u8 = 60;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// Stream Control Transmission Protocol.
    pub const SCTP: u8 = 132;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn be_values_are_stored_as_on_the_wire() {
        let port = Be16::from_host(8080);
        assert_eq!(port.0.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port.to_host(), 8080);
        let ip = Be32::from_octets([198, 19, 0, 1]);
        assert_eq!(ip.0.to_ne_bytes(), [198, 19, 0, 1]);
        assert_eq!(ip.to_host(), 0xc613_0001);
        assert_eq!(Be32::from_host(0xc613_0001), ip);
        assert_eq!(ETH_P_IP.0.to_ne_bytes(), [0x08, 0x00]);
        assert_eq!(ETH_P_IPV6.0.to_ne_bytes(), [0x86, 0xdd]);
    }
}
