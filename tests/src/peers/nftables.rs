//! kube-proxy's nftables mode (KEP-3866, `pkg/proxy/nftables/proxier.go`, 1.31 to 1.33) as it
//! writes a full sync for `ClusterIP` Services: one `nft -f` transaction of flat `add` commands
//! in the `ip kube-proxy` table: the table, its sets and maps, every chain (base, helper,
//! per-Service, per-endpoint), every rule, then the elements (nft resolves a rule's `@set` and
//! `jump`/`goto` targets as it reads it, so they come first, as knftables orders a transaction).
//!
//! Dispatch is the `service-ips` verdict map (`ipv4_addr . inet_proto . inet_service : goto
//! service-...`), so a Service's position does not matter. Each `service-<hash>-ns/name/tcp/port`
//! chain marks traffic from outside the cluster CIDR for masquerade and picks an endpoint with
//! `numgen random mod n vmap { 0 : goto endpoint-..., ... }`; each endpoint chain marks hairpin
//! traffic and DNATs to `pod:port`.

use std::fmt::Write as _;

use super::services::{
    CLUSTER_CIDR, PORT, SERVICE_CIDR, ServiceSpec, TARGET_PORT, nft_endpoint_chain,
    nft_service_chain,
};

/// The table kube-proxy owns.
pub const TABLE: &str = "ip kube-proxy";

/// Declares `name` (a base chain when `spec` is not empty) in `o` and appends its `rules` to
/// `r`: every chain is declared before any rule, since a rule may only jump to a chain that
/// exists.
fn chain(o: &mut String, r: &mut String, name: &str, spec: &str, rules: &[&str]) {
    let t = TABLE;
    if spec.is_empty() {
        let _ = writeln!(o, "add chain {t} {name}");
    } else {
        let _ = writeln!(o, "add chain {t} {name} {{ {spec} ; }}");
    }
    for rule in rules {
        let _ = writeln!(r, "add rule {t} {name} {rule}");
    }
}

/// The table's sets and maps (declared before the rules that name them: nft resolves `@name`
/// as it reads a rule).
const SETS: &[&str] = &[
    "set cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
    "set nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
    "map firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }",
    "map no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
    "map no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }",
    "map service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
    "map service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
];

/// The base and helper chains: (name, base-chain spec or empty, rules). `cluster-ips-check`'s
/// rule naming the service CIDR follows them.
const CHAINS: &[(&str, &str, &[&str])] = &[
    ("mark-for-masquerade", "", &["mark set mark or 0x4000"]),
    (
        "masquerading",
        "",
        &[
            "mark and 0x4000 == 0 return",
            "mark set mark xor 0x4000",
            "masquerade fully-random",
        ],
    ),
    (
        "services",
        "",
        &[
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ],
    ),
    (
        "service-endpoints-check",
        "",
        &["ip daddr . meta l4proto . th dport vmap @no-endpoint-services"],
    ),
    (
        "filter-prerouting",
        "type filter hook prerouting priority -110",
        &["ct state new jump firewall-check"],
    ),
    (
        "filter-forward",
        "type filter hook forward priority -110",
        &[
            "ct state new jump service-endpoints-check",
            "ct state new jump cluster-ips-check",
        ],
    ),
    (
        "filter-input",
        "type filter hook input priority -110",
        &[
            "ct state new jump nodeport-endpoints-check",
            "ct state new jump service-endpoints-check",
        ],
    ),
    (
        "filter-output",
        "type filter hook output priority -110",
        &[
            "ct state new jump service-endpoints-check",
            "ct state new jump firewall-check",
        ],
    ),
    (
        "filter-output-post-dnat",
        "type filter hook output priority -90",
        &["ct state new jump cluster-ips-check"],
    ),
    (
        "nat-output",
        "type nat hook output priority -100",
        &["jump services"],
    ),
    (
        "nat-postrouting",
        "type nat hook postrouting priority 100",
        &["jump masquerading"],
    ),
    (
        "nat-prerouting",
        "type nat hook prerouting priority -100",
        &["jump services"],
    ),
    (
        "nodeport-endpoints-check",
        "",
        &["ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"],
    ),
    (
        "cluster-ips-check",
        "",
        &["ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""],
    ),
    (
        "firewall-check",
        "",
        &["ip daddr . meta l4proto . th dport vmap @firewall-ips"],
    ),
    (
        "reject-chain",
        "comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"",
        &["reject"],
    ),
];

/// The table, its sets and maps, and the base and helper chains: the same for every sync.
fn fixed(o: &mut String, r: &mut String) {
    let t = TABLE;
    let _ = writeln!(o, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    for set in SETS {
        let _ = writeln!(o, "add {} {t} {}", &set[..3], &set[4..]);
    }
    for (name, spec, rules) in CHAINS {
        chain(o, r, name, spec, rules);
    }
    let _ = writeln!(
        r,
        "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
}

/// The `nft -f` input for `services`.
#[must_use]
pub fn render(services: &[ServiceSpec]) -> String {
    let mut o = String::new();
    let mut r = String::new();
    let t = TABLE;
    fixed(&mut o, &mut r);
    for s in services {
        let svc = nft_service_chain(s);
        let eps: Vec<String> = s
            .endpoints
            .iter()
            .map(|e| nft_endpoint_chain(s, *e))
            .collect();
        let masq = format!(
            "ip daddr {} tcp dport {PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            s.vip
        );
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{i} : goto {e}"))
            .collect();
        let pick = format!(
            "numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        chain(&mut o, &mut r, &svc, "", &[&masq, &pick]);
        for (ep, chain_name) in s.endpoints.iter().zip(&eps) {
            let hairpin = format!("ip saddr {ep} jump mark-for-masquerade");
            let dnat = format!("meta l4proto tcp dnat to {ep}:{TARGET_PORT}");
            chain(&mut o, &mut r, chain_name, "", &[&hairpin, &dnat]);
        }
    }
    o.push_str(&r);
    for s in services {
        let _ = writeln!(o, "add element {t} cluster-ips {{ {} }}", s.vip);
        let _ = writeln!(
            o,
            "add element {t} service-ips {{ {} . tcp . {PORT} : goto {} }}",
            s.vip,
            nft_service_chain(s)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{super::services, *};

    #[test]
    fn two_services_render_exactly() {
        let be = [
            Ipv4Addr::new(198, 18, 1, 11),
            Ipv4Addr::new(198, 18, 1, 12),
            Ipv4Addr::new(198, 18, 1, 13),
        ];
        let svcs = services::services(2, &be).unwrap();
        let text = render(&svcs);
        let lines: Vec<&str> = text.lines().collect();
        let s1 = nft_service_chain(&svcs[0]);
        let s2 = nft_service_chain(&svcs[1]);
        let e = |j: usize| nft_endpoint_chain(&svcs[1], be[j]);
        // The table, then 2 sets and 5 maps.
        assert_eq!(
            lines[0],
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }"
        );
        assert!(
            lines[1..8]
                .iter()
                .all(|l| l.starts_with("add set ") || l.starts_with("add map "))
        );
        assert!(lines.contains(
            &"add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }"
        ));
        // Every chain before the first rule, every rule before the first element.
        let first_rule = lines
            .iter()
            .position(|l| l.starts_with("add rule "))
            .unwrap();
        let first_elem = lines
            .iter()
            .position(|l| l.starts_with("add element "))
            .unwrap();
        assert!(
            lines[8..first_rule]
                .iter()
                .all(|l| l.starts_with("add chain "))
        );
        assert!(
            lines[first_rule..first_elem]
                .iter()
                .all(|l| l.starts_with("add rule "))
        );
        // 16 base and helper chains + 2 x (a service chain + 3 endpoint chains).
        assert_eq!(first_rule - 8, 16 + 2 * 4);
        assert!(lines.contains(
            &"add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
        ));
        let chain_decl = format!("add chain ip kube-proxy {}", e(2));
        assert!(lines[..first_rule].contains(&chain_decl.as_str()));
        // The measured Service's rules, in order, then the elements.
        let expected = [
            format!(
                "add rule ip kube-proxy {s2} ip daddr 198.19.255.1 tcp dport 80 ip saddr != 198.18.0.0/16 jump mark-for-masquerade"
            ),
            format!(
                "add rule ip kube-proxy {s2} numgen random mod 3 vmap {{ 0 : goto {} , 1 : goto {} , 2 : goto {} }}",
                e(0),
                e(1),
                e(2)
            ),
            format!(
                "add rule ip kube-proxy {} ip saddr 198.18.1.11 jump mark-for-masquerade",
                e(0)
            ),
            format!(
                "add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.1.11:5000",
                e(0)
            ),
            format!(
                "add rule ip kube-proxy {} ip saddr 198.18.1.12 jump mark-for-masquerade",
                e(1)
            ),
            format!(
                "add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.1.12:5000",
                e(1)
            ),
            format!(
                "add rule ip kube-proxy {} ip saddr 198.18.1.13 jump mark-for-masquerade",
                e(2)
            ),
            format!(
                "add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.1.13:5000",
                e(2)
            ),
            "add element ip kube-proxy cluster-ips { 198.19.0.1 }".to_owned(),
            format!(
                "add element ip kube-proxy service-ips {{ 198.19.0.1 . tcp . 80 : goto {s1} }}"
            ),
            "add element ip kube-proxy cluster-ips { 198.19.255.1 }".to_owned(),
            format!(
                "add element ip kube-proxy service-ips {{ 198.19.255.1 . tcp . 80 : goto {s2} }}"
            ),
        ];
        assert_eq!(&lines[first_elem - 8..], expected.as_slice());
        assert!(lines.contains(
            &"add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        assert!(lines.contains(&"add rule ip kube-proxy masquerading masquerade fully-random"));
    }
}
