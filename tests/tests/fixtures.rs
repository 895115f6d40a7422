//! Packet fixture table for the kernel programs, run through `BPF_PROG_TEST_RUN` (needs root).
//!
//! `cargo test -p svc-tests --test fixtures` runs every row; `... -- ROW` runs one row;
//! `SVC_FIXTURE_REPEAT=N` sets how many kernel runs measure each row's ns/packet (default 2000;
//! 1 turns measuring off). Rows run on as many threads as there are CPUs (the verifier is most
//! of a row's time); the figures are printed as one table at the end. For figures to quote,
//! run one thread (`-- --test-threads=1`), as `cargo xtask bench` does.

use libtest_mimic::{Arguments, Failed, Trial};
use svc_agent::loader::PROG_TC_FROM_POD as FROM_POD;
use svc_common::stats::PktCounter::{
    Fragment, Icmp, Icmpv6, Ipv4, Ipv6, Ipv6ExtTooLong, MalformedIp, MalformedL4, NonIp, OtherL4,
    Tcp, Udp,
};
use svc_tests::{
    fixture::{self, Fixture},
    packets::{self, Flow, SYN, TcpFlags},
};

/// A pod on node 1 talking to a pod on node 2 (no service involved).
fn v4() -> Flow {
    Flow::new("198.18.1.10", 40000, "198.18.2.10", 5000)
}
fn v6() -> Flow {
    Flow::new("2001:db8:1::10", 40000, "2001:db8:2::10", 5000)
}

/// An IPv6 UDP frame with a chain of `n` extension headers of type `ext` (8 bytes each).
fn ipv6_with_ext(ext: u8, n: usize) -> Vec<u8> {
    let mut frame = packets::udp(v6(), b"data");
    let udp = frame.split_off(54);
    let mut chain = Vec::new();
    for i in 0..n {
        let next = if i + 1 == n { 17 } else { ext };
        chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    if ext == 44 {
        // A fragment header: offset 0, more-fragments set.
        chain[3] = 1;
    }
    frame[20] = ext;
    let plen = (chain.len() + udp.len()) as u16;
    frame[18..20].copy_from_slice(&plen.to_be_bytes());
    frame.extend_from_slice(&chain);
    frame.extend_from_slice(&udp);
    frame
}

/// An IPv4 TCP SYN with `words` 32-bit words of IP options (NOPs then EOL).
fn ipv4_with_options(words: usize) -> Vec<u8> {
    ipv4_with_options_flow(v4(), words)
}

/// [`ipv4_with_options`] for any IPv4 flow.
fn ipv4_with_options_flow(flow: Flow, words: usize) -> Vec<u8> {
    let frame = packets::tcp(flow, SYN, b"");
    let mut out = frame[..34].to_vec();
    out.extend(std::iter::repeat_n(1u8, words * 4 - 1));
    out.push(0);
    out.extend_from_slice(&frame[34..]);
    out[14] = 0x40 | (5 + words as u8);
    let tot = (out.len() - 14) as u16;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    packets::fix_ipv4_checksum(&mut out);
    out
}

fn with(mut frame: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut frame);
    frame
}

fn row(name: &str, input: Vec<u8>) -> Fixture {
    Fixture::passes(name, FROM_POD, input)
}

#[path = "fixtures/clusterip.rs"]
mod clusterip;
#[path = "fixtures/conntrack.rs"]
mod conntrack;
#[path = "fixtures/edges.rs"]
mod edges;
#[path = "fixtures/ranges.rs"]
mod ranges;
#[path = "fixtures/world.rs"]
mod world;

fn table() -> Vec<Fixture> {
    let mut rows = parse_rows();
    rows.extend(clusterip::rows());
    rows.extend(conntrack::rows());
    rows.extend(edges::rows());
    rows.extend(ranges::rows());
    rows.extend(world::rows());
    rows.extend(fragment_rows());
    rows.extend(malformed_rows());
    rows
}

/// Well-formed traffic that is not for a service passes untouched, counted.
fn parse_rows() -> Vec<Fixture> {
    let ack = TcpFlags {
        ack: Some(1),
        psh: true,
        ..TcpFlags::default()
    };
    vec![
        row("parse/ipv4_tcp_syn", packets::tcp(v4(), SYN, b"")).counts(&[Ipv4, Tcp]),
        row(
            "parse/ipv4_tcp_data",
            packets::tcp(v4(), ack, b"GET / HTTP/1.1\r\n\r\n"),
        )
        .counts(&[Ipv4, Tcp]),
        row("parse/ipv4_tcp_options", packets::tcp_with_options(v4())).counts(&[Ipv4, Tcp]),
        row("parse/ipv4_udp", packets::udp(v4(), b"query")).counts(&[Ipv4, Udp]),
        row(
            "parse/ipv4_udp_zero_checksum",
            with(packets::udp(v4(), b"q"), |f| {
                f[40..42].copy_from_slice(&[0, 0]);
            }),
        )
        .counts(&[Ipv4, Udp]),
        row("parse/ipv4_icmp_echo", packets::echo_request(v4(), 1)).counts(&[Ipv4, Icmp]),
        row("parse/ipv4_ip_options", ipv4_with_options(3)).counts(&[Ipv4, Tcp]),
        row("parse/ipv4_max_ip_options", ipv4_with_options(10)).counts(&[Ipv4, Tcp]),
        row(
            "parse/ipv4_gre_is_other_l4",
            packets::ipv4_raw(v4(), 47, &[0; 8]),
        )
        .counts(&[Ipv4, OtherL4]),
        row(
            "parse/ipv4_ethernet_padding",
            with(packets::udp(v4(), b"q"), |f| f.resize(60, 0)),
        )
        .counts(&[Ipv4, Udp]),
        row("parse/ipv6_tcp_syn", packets::tcp(v6(), SYN, b"")).counts(&[Ipv6, Tcp]),
        row("parse/ipv6_udp", packets::udp(v6(), b"query")).counts(&[Ipv6, Udp]),
        row("parse/ipv6_icmpv6_echo", packets::echo_request(v6(), 1)).counts(&[Ipv6, Icmpv6]),
        row("parse/ipv6_hopopts_then_udp", ipv6_with_ext(0, 1)).counts(&[Ipv6, Udp]),
        row("parse/ipv6_three_dstopts_then_udp", ipv6_with_ext(60, 3)).counts(&[Ipv6, Udp]),
        row(
            "parse/arp_is_not_ip",
            packets::arp_request([198, 18, 1, 10], [198, 18, 1, 1]),
        )
        .counts(&[NonIp]),
    ]
}

/// Fragments: counted as such; the transport header is not looked at.
fn fragment_rows() -> Vec<Fixture> {
    vec![
        row(
            "frag/ipv4_first_fragment",
            with(packets::udp(v4(), b"q"), |f| {
                f[20] = 0x20; // more fragments
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[Ipv4, Fragment]),
        row(
            "frag/ipv4_later_fragment",
            with(packets::udp(v4(), b"q"), |f| {
                f[21] = 0x10; // offset 16 * 8 bytes
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[Ipv4, Fragment]),
        row("frag/ipv6_fragment_header", ipv6_with_ext(44, 1)).counts(&[Ipv6, Fragment]),
    ]
}

/// Malformed and truncated input: counted under a named reason, passed to the kernel.
#[expect(
    clippy::too_many_lines,
    reason = "a fixture table: one row per case reads best in one place"
)]
fn malformed_rows() -> Vec<Fixture> {
    vec![
        // BPF_PROG_TEST_RUN refuses IP frames shorter than the fixed IP header (EINVAL), so the
        // shortest truncation a row can carry cuts the header's options off.
        row(
            "malformed/ipv4_options_cut_off",
            with(packets::tcp(v4(), SYN, b""), |f| {
                f.truncate(34);
                f[14] = 0x46;
                f[16..18].copy_from_slice(&24u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv4_bad_version",
            with(packets::tcp(v4(), SYN, b""), |f| f[14] = 0x65),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv4_ihl_below_5",
            with(packets::tcp(v4(), SYN, b""), |f| f[14] = 0x44),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv4_total_length_beyond_frame",
            with(packets::tcp(v4(), SYN, b""), |f| {
                f[16..18].copy_from_slice(&1500u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv4_total_length_below_ihl",
            with(packets::tcp(v4(), SYN, b""), |f| {
                f[16..18].copy_from_slice(&12u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv4_tcp_header_cut_by_total_length",
            with(packets::tcp(v4(), SYN, b""), |f| {
                // The frame still carries 20 bytes of TCP, but the IP packet says it ends after 10.
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[Ipv4, MalformedL4]),
        row(
            "malformed/ipv4_tcp_truncated",
            with(packets::tcp(v4(), SYN, b""), |f| {
                f.truncate(44);
                f[16..18].copy_from_slice(&30u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[Ipv4, MalformedL4]),
        row(
            "malformed/ipv4_tcp_data_offset_below_5",
            with(packets::tcp(v4(), SYN, b""), |f| f[46] = 0x40),
        )
        .counts(&[Ipv4, MalformedL4]),
        row(
            "malformed/ipv4_tcp_data_offset_beyond_packet",
            with(packets::tcp(v4(), SYN, b""), |f| f[46] = 0xf0),
        )
        .counts(&[Ipv4, MalformedL4]),
        row(
            "malformed/ipv4_udp_truncated",
            with(packets::udp(v4(), b""), |f| {
                f.truncate(38);
                f[16..18].copy_from_slice(&24u16.to_be_bytes());
                packets::fix_ipv4_checksum(f);
            }),
        )
        .counts(&[Ipv4, MalformedL4]),
        row(
            "malformed/ipv6_header_only_udp_missing",
            with(packets::udp(v6(), b""), |f| {
                f.truncate(54);
                f[18..20].copy_from_slice(&0u16.to_be_bytes());
            }),
        )
        .counts(&[Ipv6, MalformedL4]),
        row(
            "malformed/ipv6_bad_version",
            with(packets::udp(v6(), b""), |f| f[14] = 0x40),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv6_payload_length_beyond_frame",
            with(packets::udp(v6(), b""), |f| {
                f[18..20].copy_from_slice(&900u16.to_be_bytes());
            }),
        )
        .counts(&[MalformedIp]),
        row(
            "malformed/ipv6_udp_truncated",
            with(packets::udp(v6(), b""), |f| {
                f.truncate(58);
                f[18..20].copy_from_slice(&4u16.to_be_bytes());
            }),
        )
        .counts(&[Ipv6, MalformedL4]),
        row(
            "malformed/ipv6_ext_header_truncated",
            with(ipv6_with_ext(60, 1), |f| {
                f.truncate(55);
                f[18..20].copy_from_slice(&1u16.to_be_bytes());
            }),
        )
        .counts(&[Ipv6, MalformedL4]),
        row("malformed/ipv6_ext_chain_too_long", ipv6_with_ext(60, 5))
            .counts(&[Ipv6, Ipv6ExtTooLong]),
    ]
}

/// The agent pins exactly the maps `svc_common::MAP_NAMES` lists: it must be the object's set
/// of named maps. Section maps (`.rodata*`, `.data`, `.bss`: constants and globals the
/// compiler placed) belong to one load and are never pinned.
fn map_names_match() -> anyhow::Result<()> {
    let ebpf = svc_agent::loader::load_object(svc_agent::loader::MapSizes::small())?;
    let mut in_object: Vec<&str> = ebpf
        .maps()
        .map(|(name, _)| name)
        .filter(|n| !n.starts_with('.'))
        .collect();
    in_object.sort_unstable();
    let mut listed = svc_common::MAP_NAMES.to_vec();
    listed.sort_unstable();
    anyhow::ensure!(
        in_object == listed,
        "object has maps {in_object:?}, MAP_NAMES lists {listed:?}"
    );
    Ok(())
}

/// Every program loads, and how much of the verifier's budget (1,000,000 instructions processed
/// per load) each one takes is printed: the figure to watch when the packet path grows.
fn verifier_budget() -> anyhow::Result<()> {
    let mut ebpf = svc_agent::loader::load_object(svc_agent::loader::MapSizes::small())?;
    svc_agent::loader::load_programs(&mut ebpf, true)?;
    let mut figures = Vec::new();
    for (name, prog) in ebpf.programs() {
        let info = prog.info()?;
        let n = info.verified_instruction_count().unwrap_or(0);
        figures.push(format!("{name} {n}"));
    }
    figures.sort();
    figure(
        "object/programs_verify_within_budget",
        format!("verified insns: {}", figures.join(", ")),
    );
    Ok(())
}

/// The figures rows measured, printed as one table when every row has run.
static FIGURES: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Records a figure of row `row` for the table printed at the end.
fn figure(row: &str, what: String) {
    FIGURES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((row.to_owned(), what));
}

fn main() {
    let args = Arguments::from_args();
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the packet fixture tests need root (BPF_PROG_TEST_RUN loads programs); run them as root"
        );
        std::process::exit(1);
    }
    let repeat = std::env::var("SVC_FIXTURE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000u32);
    let mut trials: Vec<Trial> = vec![
        Trial::test("object/map_names_match_the_object", || {
            map_names_match().map_err(|e| Failed::from(format!("{e:#}")))
        }),
        Trial::test("object/programs_verify_within_budget", || {
            verifier_budget().map_err(|e| Failed::from(format!("{e:#}")))
        }),
    ];
    trials.extend(table().into_iter().map(|f| {
        Trial::test(f.name.clone(), move || match fixture::run(&f, repeat) {
            Ok(report) => {
                if let Some(d) = report.per_packet {
                    figure(&f.name, format!("{:>5} ns/pkt", d.as_nanos()));
                }
                Ok(())
            }
            Err(e) => Err(Failed::from(format!("{e:#}"))),
        })
    }));
    let conclusion = libtest_mimic::run(&args, trials);
    let mut figures = std::mem::take(
        &mut *FIGURES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    if !figures.is_empty() {
        figures.sort();
        let width = figures.iter().map(|(row, _)| row.len()).max().unwrap_or(0);
        println!("figures (kernel-timed median per row; one thread for figures to quote):");
        for (row, what) in figures {
            println!("  {row:<width$}  {what}");
        }
    }
    conclusion.exit();
}
