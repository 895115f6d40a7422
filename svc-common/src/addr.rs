//! Addresses as the maps hold them: 16 bytes for both families (an IPv4 address in the first
//! four bytes, the rest zero), plus a family byte in every key. One layout, one code path.

/// Address family value for IPv4 in map keys and values.
pub const FAMILY_V4: u8 = 4;
/// Address family value for IPv6 in map keys and values.
pub const FAMILY_V6: u8 = 6;

/// An IPv4 or IPv6 address in network byte order, IPv4 in the first four bytes.
pub type Addr = [u8; 16];

/// Widens an IPv4 address (network order octets) to an [`Addr`].
#[must_use]
pub const fn from_v4(o: [u8; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[0] = o[0];
    a[1] = o[1];
    a[2] = o[2];
    a[3] = o[3];
    a
}

/// The IPv4 octets of an [`Addr`] holding an IPv4 address.
#[must_use]
pub const fn to_v4(a: &Addr) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_sits_in_the_first_four_bytes() {
        let a = from_v4([198, 19, 0, 10]);
        assert_eq!(a[..4], [198, 19, 0, 10]);
        assert!(a[4..].iter().all(|b| *b == 0));
        assert_eq!(to_v4(&a), [198, 19, 0, 10]);
    }
}
