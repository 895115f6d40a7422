//! kube-proxy's iptables mode, as `pkg/proxy/iptables/proxier.go` (1.28 to 1.33) writes a full
//! sync for `ClusterIP` Services: one `iptables-restore` input with the `filter` and `nat`
//! tables.
//!
//! - `nat`: `PREROUTING`/`OUTPUT` -> `KUBE-SERVICES`, one `-d VIP/32 -p tcp --dport 80 -j
//!   KUBE-SVC-...` rule per Service (a linear walk; the last rule jumps to `KUBE-NODEPORTS` for
//!   local addresses); each `KUBE-SVC-...` marks traffic from outside the cluster CIDR for
//!   masquerade, then picks an endpoint with `-m statistic --mode random --probability 1/n`
//!   (n endpoints left; the last jump unconditional) into `KUBE-SEP-...`, which marks hairpin
//!   traffic and DNATs to `pod:port`; `KUBE-POSTROUTING` masquerades marked packets
//!   (`--random-fully`).
//! - `filter`: `KUBE-FORWARD` (drop `INVALID`, accept marked and established traffic) and the
//!   empty firewall/NodePort chains, with the jumps from the built-in chains that kube-proxy
//!   adds with `iptables -I` (here in the same file).
//!
//! Above 1,000 endpoints kube-proxy leaves out the per-endpoint comments (its
//! `largeClusterEndpointsThreshold`), as here. Left out: the `nfacct` counter on the `INVALID`
//! drop (needs the `nfnetlink_acct` module) and the localhost-NodePort `KUBE-FIREWALL` rule.

use std::fmt::Write as _;

use super::services::{
    CLUSTER_CIDR, PORT, ServiceSpec, TARGET_PORT, iptables_sep_chain, iptables_svc_chain,
};

/// kube-proxy's `largeClusterEndpointsThreshold`: above it, endpoint rules carry no comments.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1_000;

/// The `filter` table and the start of `nat` (its fixed chains), the same for every sync.
const HEAD: &str = concat!(
    "*filter\n",
    ":KUBE-NODEPORTS - [0:0]\n",
    ":KUBE-SERVICES - [0:0]\n",
    ":KUBE-EXTERNAL-SERVICES - [0:0]\n",
    ":KUBE-FORWARD - [0:0]\n",
    ":KUBE-PROXY-FIREWALL - [0:0]\n",
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
    "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
    "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
    "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
    "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
    "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    "COMMIT\n",
    "*nat\n",
    ":KUBE-SERVICES - [0:0]\n",
    ":KUBE-NODEPORTS - [0:0]\n",
    ":KUBE-POSTROUTING - [0:0]\n",
    ":KUBE-MARK-MASQ - [0:0]\n"
);

/// The fixed `nat` rules: the built-in chains' jumps, masquerading, the masquerade mark.
const NAT_FIXED: &str = concat!(
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
    "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
);

/// The `iptables-restore` input for `services`.
#[must_use]
pub fn render(services: &[ServiceSpec]) -> String {
    let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let large = endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mut o = String::from(HEAD);
    let chains: Vec<(String, Vec<String>)> = services
        .iter()
        .map(|s| {
            let seps = s
                .endpoints
                .iter()
                .map(|e| iptables_sep_chain(s, *e))
                .collect();
            (iptables_svc_chain(s), seps)
        })
        .collect();
    for (svc, seps) in &chains {
        let _ = writeln!(o, ":{svc} - [0:0]");
        for sep in seps {
            let _ = writeln!(o, ":{sep} - [0:0]");
        }
    }
    o.push_str(NAT_FIXED);
    for (s, (svc, _)) in services.iter().zip(&chains) {
        let _ = writeln!(
            o,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 \
             --dport {PORT} -j {svc}",
            s.port_name(),
            s.vip
        );
    }
    o.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must \
         be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for (s, (svc, seps)) in services.iter().zip(&chains) {
        let name = s.port_name();
        let comment = |text: &str| {
            if large {
                String::new()
            } else {
                format!(" -m comment --comment \"{text}\"")
            }
        };
        let _ = writeln!(
            o,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 \
             --dport {PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            s.vip
        );
        let n = s.endpoints.len();
        for (i, (ep, sep)) in s.endpoints.iter().zip(seps).enumerate() {
            let stat = if i + 1 < n {
                // kube-proxy: fmt.Sprintf("%0.10f", 1.0/float64(n-i)).
                #[expect(
                    clippy::cast_precision_loss,
                    reason = "endpoint counts are far below 2^52"
                )]
                let p = 1.0 / (n - i) as f64;
                format!(" -m statistic --mode random --probability {p:.10}")
            } else {
                String::new()
            };
            let c = comment(&format!("{name} -> {ep}:{TARGET_PORT}"));
            let _ = writeln!(o, "-A {svc}{c}{stat} -j {sep}");
        }
        for (ep, sep) in s.endpoints.iter().zip(seps) {
            let c = comment(&name);
            let _ = writeln!(o, "-A {sep}{c} -s {ep}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(
                o,
                "-A {sep}{c} -m tcp -p tcp -j DNAT --to-destination {ep}:{TARGET_PORT}"
            );
        }
    }
    o.push_str("COMMIT\n");
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
        let chain1 = iptables_svc_chain(&svcs[0]);
        let chain2 = iptables_svc_chain(&svcs[1]);
        let sep = |i: usize, j: usize| iptables_sep_chain(&svcs[i], svcs[i].endpoints[j]);
        let nat = text.split("*nat\n").nth(1).unwrap();
        let rules: Vec<&str> = nat.lines().filter(|l| l.starts_with("-A ")).collect();
        let expected_tail = [
            format!(
                "-A KUBE-SERVICES -m comment --comment \"default/svc-1:http cluster IP\" -m tcp -p tcp -d 198.19.0.1/32 --dport 80 -j {chain1}"
            ),
            format!(
                "-A KUBE-SERVICES -m comment --comment \"default/svc-2:http cluster IP\" -m tcp -p tcp -d 198.19.255.1/32 --dport 80 -j {chain2}"
            ),
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_owned(),
            format!(
                "-A {chain1} -m comment --comment \"default/svc-1:http cluster IP\" -m tcp -p tcp -d 198.19.0.1/32 --dport 80 ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ"
            ),
            format!(
                "-A {chain1} -m comment --comment \"default/svc-1:http -> 198.18.128.3:5000\" -m statistic --mode random --probability 0.3333333333 -j {}",
                sep(0, 0)
            ),
            format!(
                "-A {chain1} -m comment --comment \"default/svc-1:http -> 198.18.128.4:5000\" -m statistic --mode random --probability 0.5000000000 -j {}",
                sep(0, 1)
            ),
            format!(
                "-A {chain1} -m comment --comment \"default/svc-1:http -> 198.18.128.5:5000\" -j {}",
                sep(0, 2)
            ),
            format!(
                "-A {} -m comment --comment \"default/svc-1:http\" -s 198.18.128.3/32 -j KUBE-MARK-MASQ",
                sep(0, 0)
            ),
            format!(
                "-A {} -m comment --comment \"default/svc-1:http\" -m tcp -p tcp -j DNAT --to-destination 198.18.128.3:5000",
                sep(0, 0)
            ),
        ];
        // After the 7 fixed rules (PREROUTING, OUTPUT, POSTROUTING, KUBE-POSTROUTING x3,
        // KUBE-MARK-MASQ).
        assert_eq!(&rules[7..7 + expected_tail.len()], expected_tail.as_slice());
        let last: Vec<&str> = rules[rules.len() - 3..].to_vec();
        assert_eq!(
            last,
            [
                format!(
                    "-A {} -m comment --comment \"default/svc-2:http\" -m tcp -p tcp -j DNAT --to-destination 198.18.1.12:5000",
                    sep(1, 1)
                ),
                format!(
                    "-A {} -m comment --comment \"default/svc-2:http\" -s 198.18.1.13/32 -j KUBE-MARK-MASQ",
                    sep(1, 2)
                ),
                format!(
                    "-A {} -m comment --comment \"default/svc-2:http\" -m tcp -p tcp -j DNAT --to-destination 198.18.1.13:5000",
                    sep(1, 2)
                ),
            ]
        );
        // Every chain is declared once, before the rules; two tables, two commits.
        assert_eq!(text.matches(&format!(":{chain2} - [0:0]")).count(), 1);
        assert_eq!(text.matches("COMMIT\n").count(), 2);
        assert_eq!(rules.len(), 7 + 3 + 2 * (1 + 3 + 2 * 3));
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let be = [Ipv4Addr::new(198, 18, 1, 11)];
        let svcs = services::services(1_001, &be).unwrap();
        let text = render(&svcs);
        let sep = iptables_sep_chain(&svcs[0], svcs[0].endpoints[0]);
        assert!(text.contains(&format!("-A {sep} -s 198.18.128.1/32 -j KUBE-MARK-MASQ\n")));
        // Service rules keep theirs.
        assert!(text.contains("\"default/svc-1001:http cluster IP\""));
    }
}
