//! The Services every mode programs: `S` `ClusterIP` Services with one TCP port (80 ->
//! [`TARGET_PORT`]) and `K` endpoints each. Services `1..S` are fillers whose endpoints are
//! never contacted (addresses in 198.18.128.0/17, no pod has them); Service `S`, the measured
//! one, is [`MEASURED_VIP`] with the real backends, and comes last everywhere (the last rule of
//! iptables' linear `KUBE-SERVICES` walk: the worst case).
//!
//! Also the names kube-proxy gives its chains (`KUBE-SVC-<hash>`, `service-<hash>-ns/name/...`):
//! the first characters of the base32 SHA-256 of the service port's name, as
//! `pkg/proxy/iptables` and `pkg/proxy/nftables` compute them.

use std::net::Ipv4Addr;

/// The Services' port.
pub const PORT: u16 = 80;
/// The endpoints' port (nginx listens there in the backend pods).
pub const TARGET_PORT: u16 = 5000;
/// The measured Service's `ClusterIP`.
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The Services' namespace.
pub const NAMESPACE: &str = "default";
/// The Service port's name.
pub const PORT_NAME: &str = "http";
/// kube-proxy's `--cluster-cidr`: traffic from outside it to a `ClusterIP` is masqueraded.
pub const CLUSTER_CIDR: &str = "198.18.0.0/16";
/// The service CIDR (nftables' `cluster-ips-check` drops traffic to unallocated addresses).
pub const SERVICE_CIDR: &str = "198.19.0.0/16";
/// Most Services a run may ask for: filler VIPs are `198.19.0.1` upward and must stay below
/// the measured one.
pub const MAX_SERVICES: u32 = 65_000;

/// One Service with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `svc-<i>`.
    pub name: String,
    /// Its `ClusterIP`.
    pub vip: Ipv4Addr,
    /// Its endpoints' addresses (all on [`TARGET_PORT`]).
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceSpec {
    /// kube-proxy's `ServicePortName` string: `namespace/name:port`.
    #[must_use]
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }
}

/// The `count` Services of one run, the measured one (with `backends`) last.
///
/// # Errors
/// When `count` is 0 or above [`MAX_SERVICES`], or `backends` is empty.
pub fn services(count: u32, backends: &[Ipv4Addr]) -> anyhow::Result<Vec<ServiceSpec>> {
    anyhow::ensure!(
        (1..=MAX_SERVICES).contains(&count),
        "{count} Services: expected 1 to {MAX_SERVICES}"
    );
    anyhow::ensure!(!backends.is_empty(), "no backends for the measured Service");
    let k = u32::try_from(backends.len())?;
    let filler_base = u32::from(Ipv4Addr::new(198, 18, 128, 0));
    let vip_base = u32::from(Ipv4Addr::new(198, 19, 0, 0));
    let mut out: Vec<ServiceSpec> = (1..count)
        .map(|i| ServiceSpec {
            name: format!("svc-{i}"),
            vip: Ipv4Addr::from(vip_base + i),
            endpoints: (0..k)
                .map(|j| Ipv4Addr::from(filler_base + (i * k + j) % 32_768))
                .collect(),
        })
        .collect();
    out.push(ServiceSpec {
        name: format!("svc-{count}"),
        vip: MEASURED_VIP,
        endpoints: backends.to_vec(),
    });
    Ok(out)
}

/// RFC 4648 base32 (upper case, no padding) of `bytes`.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The first `len` characters of base32(SHA-256(`text`)), kube-proxy's chain-name hash.
#[must_use]
pub fn hash(text: &str, len: usize) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut s = base32(digest.as_ref());
    s.truncate(len);
    s
}

/// iptables `KUBE-SVC-<16>` of a Service port (`servicePortChainName`).
#[must_use]
pub fn iptables_svc_chain(svc: &ServiceSpec) -> String {
    format!("KUBE-SVC-{}", hash(&format!("{}tcp", svc.port_name()), 16))
}

/// iptables `KUBE-SEP-<16>` of an endpoint (`servicePortEndpointChainName`).
#[must_use]
pub fn iptables_sep_chain(svc: &ServiceSpec, endpoint: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(
            &format!("{}tcp{endpoint}:{TARGET_PORT}", svc.port_name()),
            16
        )
    )
}

/// nftables `ns/name/tcp/port`, the readable part of a Service port's chain names.
fn nft_base(svc: &ServiceSpec) -> String {
    format!("{NAMESPACE}/{}/tcp/{PORT_NAME}", svc.name)
}

/// nftables `service-<8>-ns/name/tcp/port` (`servicePortChainNameBase`).
#[must_use]
pub fn nft_service_chain(svc: &ServiceSpec) -> String {
    format!(
        "service-{}-{}",
        hash(&format!("{}tcp", svc.port_name()), 8),
        nft_base(svc)
    )
}

/// nftables `endpoint-<8>-ns/name/tcp/port__ip/port` (`servicePortEndpointChainNameBase`).
#[must_use]
pub fn nft_endpoint_chain(svc: &ServiceSpec, endpoint: Ipv4Addr) -> String {
    format!(
        "endpoint-{}-{}__{endpoint}/{TARGET_PORT}",
        hash(
            &format!("{}tcp{endpoint}:{TARGET_PORT}", svc.port_name()),
            8
        ),
        nft_base(svc)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        // RFC 4648 section 10, padding left off.
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foo"), "MZXW6");
        assert_eq!(base32(b"foob"), "MZXW6YQ");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn hash_is_the_base32_sha256_prefix() {
        // SHA-256("") = e3b0c442 98fc1c14 ...; base32 of it starts 4OYMIQUY7QOBJ.
        assert_eq!(hash("", 13), "4OYMIQUY7QOBJ");
        assert_eq!(hash("default/svc-1:httptcp", 16).len(), 16);
    }

    #[test]
    fn services_put_the_measured_one_last_with_the_backends() {
        let be = [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 12)];
        let s = services(3, &be).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "svc-1");
        assert_eq!(s[0].vip, Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(
            s[0].endpoints,
            [
                Ipv4Addr::new(198, 18, 128, 2),
                Ipv4Addr::new(198, 18, 128, 3)
            ]
        );
        assert_eq!(s[2].name, "svc-3");
        assert_eq!(s[2].vip, MEASURED_VIP);
        assert_eq!(s[2].endpoints, be);
        assert_eq!(services(1, &be).unwrap().len(), 1);
        assert!(services(0, &be).is_err());
        assert!(services(MAX_SERVICES + 1, &be).is_err());
        assert!(services(2, &[]).is_err());
        // The last filler stays below the measured VIP.
        let last = services(MAX_SERVICES, &be).unwrap();
        assert!(last[last.len() - 2].vip < MEASURED_VIP);
    }

    #[test]
    fn chain_names_have_kube_proxys_shapes() {
        let s = &services(1, &[Ipv4Addr::new(198, 18, 1, 11)]).unwrap()[0];
        let svc = iptables_svc_chain(s);
        assert!(svc.starts_with("KUBE-SVC-") && svc.len() == 25, "{svc}");
        let sep = iptables_sep_chain(s, s.endpoints[0]);
        assert!(sep.starts_with("KUBE-SEP-") && sep.len() == 25, "{sep}");
        assert_ne!(&svc[9..], &sep[9..]);
        let n = nft_service_chain(s);
        assert!(n.starts_with("service-") && n.ends_with("-default/svc-1/tcp/http"));
        let e = nft_endpoint_chain(s, s.endpoints[0]);
        assert!(
            e.ends_with("-default/svc-1/tcp/http__198.18.1.11/5000"),
            "{e}"
        );
    }
}
