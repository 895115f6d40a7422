//! Internet checksum helpers (RFC 1071) and incremental updates (RFC 1624, equation 3).
//!
//! All values are 16-bit words exactly as they sit in the packet, read in native order: the
//! ones' complement sum is byte-order independent as long as every word is read the same way,
//! so callers pass raw header fields (`Be16.0`, `Be32.0`) and store the result back raw.

/// Folds a 32-bit ones' complement accumulator into 16 bits.
#[must_use]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds a 32-bit word (two 16-bit halves) to an accumulator.
#[must_use]
pub const fn add32(sum: u32, word: u32) -> u32 {
    sum + (word & 0xffff) + (word >> 16)
}

/// New checksum after one 16-bit word of the covered data changes from `old` to `new`.
#[must_use]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// New checksum after one 32-bit word (an IPv4 address) changes from `old` to `new`.
#[must_use]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    !fold(add32(add32(!check as u32, !old), new))
}

/// New checksum after a 128-bit value (an IPv6 address, as four raw words) changes.
#[must_use]
pub const fn replace128(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i < 4 {
        sum = add32(add32(sum, !old[i]), new[i]);
        // Keep the accumulator far from overflow: fold as we go.
        sum = fold(sum) as u32;
        i += 1;
    }
    !fold(sum)
}

/// New checksum after a change whose 32-bit ones' complement difference is `diff` (what
/// `bpf_csum_diff(old, n, new, n, 0)` returns for the changed words; the kernel's
/// `inet_proto_csum_replace_by_diff`).
#[must_use]
pub const fn replace_diff(check: u16, diff: u32) -> u16 {
    let sum = !check as u64 + diff as u64;
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    !fold(sum as u32)
}

/// UDP over IPv4 may carry no checksum (zero). An update keeps zero as zero, and a computed
/// zero is sent as `0xffff` (RFC 768), because zero on the wire means "no checksum".
#[must_use]
pub const fn udp_fixup(old_check: u16, new_check: u16) -> u16 {
    if old_check == 0 {
        0
    } else if new_check == 0 {
        0xffff
    } else {
        new_check
    }
}

/// Ones' complement sum of `data` (an odd trailing byte is padded with zero), added to `sum`.
/// Not folded: combine pieces with [`add32`]-style addition, then [`finish`].
#[must_use]
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = u32::from(fold(sum + u32::from(u16::from_ne_bytes([c[0], c[1]]))));
    }
    if let [last] = chunks.remainder() {
        sum = u32::from(fold(sum + u32::from(u16::from_ne_bytes([*last, 0]))));
    }
    sum
}

/// Final checksum value (raw, as stored in the packet) for an accumulator.
#[must_use]
pub const fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// Checksum of a whole buffer, e.g. an IPv4 header with its checksum field zeroed.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum_bytes(0, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic byte generator, so the tests cover many values without a dependency.
    fn bytes(seed: u32, n: usize) -> impl Iterator<Item = u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
    }

    #[test]
    fn checksum_of_known_ipv4_header() {
        // RFC 1071-style example: a real IPv4 header, checksum field zeroed.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr).to_be_bytes(), 0xb861u16.to_ne_bytes());
        // A header including its correct checksum sums to zero.
        let mut full = hdr;
        full[10..12].copy_from_slice(&checksum(&hdr).to_ne_bytes());
        assert_eq!(checksum(&full), 0);
    }

    #[test]
    fn incremental_updates_match_full_recompute() {
        for seed in 0..2000u32 {
            let mut data: [u8; 40] = [0; 40];
            for (d, b) in data.iter_mut().zip(bytes(seed, 40)) {
                *d = b;
            }
            let check = checksum(&data);
            let mut new = data;
            for (d, b) in new[8..12].iter_mut().zip(bytes(seed + 7777, 4)) {
                *d = b;
            }
            for (d, b) in new[20..22].iter_mut().zip(bytes(seed + 9999, 2)) {
                *d = b;
            }
            for (d, b) in new[24..40].iter_mut().zip(bytes(seed + 4242, 16)) {
                *d = b;
            }
            let w32 = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            let w16 = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]);
            let w128 = |b: &[u8]| [w32(&b[0..]), w32(&b[4..]), w32(&b[8..]), w32(&b[12..])];
            let mut inc = replace32(check, w32(&data[8..]), w32(&new[8..]));
            inc = replace16(inc, w16(&data[20..]), w16(&new[20..]));
            inc = replace128(inc, &w128(&data[24..]), &w128(&new[24..]));
            let full = checksum(&new);
            // The same change of the 128-bit field as one difference (bpf_csum_diff style).
            let diff = w128(&data[24..])
                .iter()
                .zip(w128(&new[24..]))
                .fold(0u64, |s, (o, n)| s + u64::from(!o) + u64::from(n));
            let diff = (diff & 0xffff_ffff) + (diff >> 32);
            let diff = ((diff & 0xffff_ffff) + (diff >> 32)) as u32;
            let mut by_diff = replace32(check, w32(&data[8..]), w32(&new[8..]));
            by_diff = replace16(by_diff, w16(&data[20..]), w16(&new[20..]));
            by_diff = replace_diff(by_diff, diff);
            // 0x0000 and 0xffff are the same number in ones' complement; RFC 1624 arithmetic
            // never yields 0x0000 for non-zero data, a full recompute may. Compare as numbers.
            let norm = |c: u16| if c == 0xffff { 0 } else { c };
            assert_eq!(norm(inc), norm(full), "seed {seed}");
            assert_eq!(norm(by_diff), norm(full), "seed {seed}: by difference");
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0x01]), checksum(&[0x01, 0x00]));
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_becomes_ffff() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x1111, 0), 0xffff);
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }
}
