//! TLS policy and who may connect: versions, cipher suites (the server's order), key exchange
//! groups and session resumption per listener, per upstream leg and node-wide; `allow_clients`
//! (SPIFFE ID, DNS SAN, common name) and `allow_servers`. Each claim is checked against
//! `openssl s_client` as well as rustls, on the host and in every guest (where the sessions
//! that are let in go on over kTLS).

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, ClientConfig};
use tlsplice::config::{CipherSuiteName, DataPathPolicy, GroupName, Mode, VersionName};
use tlsplice::outcome::Reason;
use tlsplice_tests::ops::{echo_upstream, test_dir};
use tlsplice_tests::{
    Agent, AgentProcess, TestPki, eventually, expected_auto_path, listener, s_client, tls_client,
    tool_or_skip,
};

/// `openssl s_client -brief` against `agent` with `args`; (handshake done, all output).
fn scan(
    openssl: &std::path::Path,
    agent: std::net::SocketAddr,
    dir: &std::path::Path,
    args: &[&str],
) -> (bool, String) {
    let mut extra: Vec<&std::ffi::OsStr> = vec!["-brief".as_ref()];
    extra.extend(args.iter().map(std::ffi::OsStr::new));
    let mut child = s_client(openssl, agent, dir, &extra);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"ping\n");
    }
    let out = child.wait_with_output().expect("s_client output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("CONNECTION ESTABLISHED"), text)
}

/// `openssl s_client -status` (not brief: the OCSP block is only printed in full);
/// (handshake verified, all output).
fn scan_status(
    openssl: &std::path::Path,
    agent: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (bool, String) {
    let mut child = s_client(openssl, agent, dir, &["-status".as_ref()]);
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("s_client output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("Verify return code: 0 (ok)"), text)
}

/// One exchange through the agent with our rustls client; the error when it fails.
fn exchange(agent: std::net::SocketAddr, config: Arc<ClientConfig>) -> Result<(), rustls::Error> {
    let mut tls = tls_client(agent, config);
    let io = |e: std::io::Error| match e.into_inner().map(|e| e.downcast::<rustls::Error>()) {
        Some(Ok(e)) => *e,
        _ => rustls::Error::General("i/o".into()),
    };
    tls.write_all(b"ping").map_err(io)?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).map_err(io)?;
    assert_eq!(&back, b"ping");
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn the_scanner_sees_only_the_configured_versions_suites_and_groups_in_server_order() {
    const TEST: &str =
        "the_scanner_sees_only_the_configured_versions_suites_and_groups_in_server_order";
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let mut l = listener(Mode::Terminate, &dir, echo_upstream(), DataPathPolicy::Auto);
    l.tls.tls_versions = Some(vec![VersionName::Tls13]);
    l.tls.cipher_suites = Some(vec![
        CipherSuiteName::TLS13_AES_256_GCM_SHA384,
        CipherSuiteName::TLS13_CHACHA20_POLY1305_SHA256,
    ]);
    l.tls.groups = Some(vec![GroupName::P256]);
    let mut agent = Agent::start(l);
    // (s_client arguments, handshake completes, words its output must hold)
    #[rustfmt::skip]
    let cases: &[(&[&str], bool, &[&str])] = &[
        // The client prefers ChaCha20; the server's order wins.
        (&["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"], true, &["TLSv1.3", "TLS_AES_256_GCM_SHA384", "prime256v1"]),
        (&["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"], true, &["TLS_CHACHA20_POLY1305_SHA256"]),
        (&["-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"], false, &[]),
        (&["-tls1_2"], false, &[]),
        (&["-tls1_3", "-groups", "X25519"], false, &[]),
        (&["-tls1_3", "-groups", "X25519:P-256"], true, &["prime256v1"]),
        (&["-tls1_3", "-groups", "P-384"], false, &[]),
    ];
    let mut established = 0;
    for (args, ok, words) in cases {
        let (done, text) = scan(&openssl, agent.addr, &dir, args);
        assert_eq!(done, *ok, "s_client {args:?}:\n{text}");
        for w in *words {
            assert!(text.contains(w), "s_client {args:?}: no {w:?} in\n{text}");
        }
        established += usize::from(done);
    }
    // Every refused handshake is counted as one, and the others went on as usual.
    let mut refused = 0;
    for _ in cases {
        let r = agent.next_report();
        if r.outcome == Reason::HandshakeFailed {
            refused += 1;
        } else {
            // s_client sends its line and closes at once: a close that lands before the
            // handoff keeps the session in user space, and the report says so.
            let closed_early = r.path_reason.contains("closed its side before the handoff");
            assert!(
                r.outcome == Reason::Ok
                    && (r.data_path == Some(expected_auto_path().0) || closed_early),
                "{r:?}"
            );
        }
    }
    assert_eq!(refused, cases.len() - established);
    let _ = std::fs::remove_dir_all(dir);
}

/// A TLS 1.3 client of `pki` that offers only `groups`, in that order.
fn offering(
    pki: &TestPki,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).expect("CA into root store");
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: groups.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn the_post_quantum_hybrid_is_on_by_default_and_its_sessions_go_on_in_the_kernel() {
    use rustls::NamedGroup;
    use rustls::crypto::aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
    let pki = TestPki::generate();
    let dir = pki.write_files();
    // Reencrypt with the built-in policy on both legs: the client's leg, and the agent's own
    // client leg to a rustls upstream that has the hybrid too.
    let l = listener(
        Mode::Reencrypt,
        &dir,
        tlsplice_tests::ops::tls_echo_upstream(&pki),
        DataPathPolicy::Auto,
    );
    let mut agent = Agent::start(l);
    // (the client's groups in its order, the group it must get, words the report's session
    // text must hold)
    #[rustfmt::skip]
    let cases: &[(&[&'static dyn rustls::crypto::SupportedKxGroup], NamedGroup, &str)] = &[
        (&[X25519MLKEM768], NamedGroup::X25519MLKEM768, " X25519MLKEM768, upstream TLSv1.3"),
        (&[X25519MLKEM768, X25519], NamedGroup::X25519MLKEM768, " X25519MLKEM768, upstream TLSv1.3"),
        // The client's order picks the group: one that prefers X25519 gets it, at once.
        (&[X25519, X25519MLKEM768], NamedGroup::X25519, " X25519, upstream TLSv1.3"),
    ];
    let (path, _) = expected_auto_path();
    for (groups, want, words) in cases {
        let mut tls = tls_client(agent.addr, offering(&pki, groups));
        tls.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        tls.read_exact(&mut back).expect("the echo");
        assert_eq!(
            tls.conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(*want)
        );
        // The group the client sent a share for: no HelloRetryRequest.
        assert_eq!(tls.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
        tls.conn.send_close_notify();
        let _ = tls.flush();
        let r = agent.next_report();
        assert_eq!(r.outcome, Reason::Ok, "{r:?}");
        assert_eq!(r.data_path, Some(path), "{r:?}");
        let client = r.client_handshake.expect("the client leg's handshake");
        assert_eq!(client.group, u16::from(*want), "{r:?}");
        // The agent's upstream leg offers the hybrid first, and the upstream takes it.
        let upstream = r.upstream_handshake.expect("the upstream leg's handshake");
        assert_eq!(
            upstream.group,
            u16::from(NamedGroup::X25519MLKEM768),
            "{r:?}"
        );
        assert!(r.session.contains(words), "{}", r.session);
        assert!(r.session.ends_with(" X25519MLKEM768"), "{}", r.session);
        println!(
            "{:?}: {} ({:?})",
            groups.iter().map(|g| g.name()).collect::<Vec<_>>(),
            r.session,
            r.data_path
        );
    }

    // A listener that leaves the hybrid out refuses a client that offers nothing else, and
    // counts it; with X25519 beside it, the client gets X25519.
    let mut l = listener(Mode::Terminate, &dir, echo_upstream(), DataPathPolicy::Auto);
    l.tls.groups = Some(vec![GroupName::X25519, GroupName::P256]);
    let mut classic = Agent::start(l);
    let refused = exchange(classic.addr, offering(&pki, &[X25519MLKEM768]));
    assert!(
        matches!(
            refused,
            Err(rustls::Error::AlertReceived(
                AlertDescription::HandshakeFailure
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(classic.next_report().outcome, Reason::HandshakeFailed);
    exchange(classic.addr, offering(&pki, &[X25519MLKEM768, X25519])).expect("X25519 beside");
    let r = classic.next_report();
    assert_eq!(
        r.client_handshake.map(|h| h.group),
        Some(u16::from(NamedGroup::X25519)),
        "{r:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn session_resumption_follows_the_policy() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    for resumption in [true, false] {
        let mut l = listener(Mode::Terminate, &dir, echo_upstream(), DataPathPolicy::Auto);
        l.tls.session_resumption = Some(resumption);
        let agent = Agent::start(l);
        // One client configuration: its session cache carries the ticket to the second visit.
        let config = pki.client_config();
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut tls = tls_client(agent.addr, config.clone());
            tls.write_all(b"ping").expect("write");
            let mut back = [0u8; 4];
            tls.read_exact(&mut back).expect("read");
            kinds.push(tls.conn.handshake_kind());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        let want = if resumption {
            rustls::HandshakeKind::Resumed
        } else {
            rustls::HandshakeKind::Full
        };
        assert_eq!(
            kinds[1],
            Some(want),
            "session_resumption = {resumption}: {kinds:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn allow_clients_admits_by_spiffe_id_dns_name_or_common_name_and_denies_the_rest() {
    const TEST: &str =
        "allow_clients_admits_by_spiffe_id_dns_name_or_common_name_and_denies_the_rest";
    let openssl = tool_or_skip(TEST, "openssl");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let dir = test_dir("policy-allow");
    let port = tlsplice_tests::free_port();
    let config = format!(
        "{}client_ca = \"{ca}\"\nallow_clients = [\"spiffe://mesh.test/ns/a\", \"dns:*.b.internal\", \"cn:billing\"]\n",
        tlsplice_tests::ops::terminate_listener("web", port, echo_upstream(), &files),
        ca = files.join("ca.pem").display(),
    );
    let mut agent = AgentProcess::start(&dir, &config, &[], &[]);
    assert!(agent.child_running(), "{}", agent.log_text());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // (common name, SANs, admitted)
    #[rustfmt::skip]
    let table: &[(&str, &[&str], bool)] = &[
        ("a-web", &["spiffe://mesh.test/ns/a/sa/web"], true),
        ("a-root", &["spiffe://mesh.test/ns/a"], true),
        ("ab-web", &["spiffe://mesh.test/ns/ab/sa/web"], false),
        ("other-domain", &["spiffe://other.test/ns/a/sa/web"], false),
        ("b-api", &["api.b.internal"], true),
        ("b-deep", &["x.api.b.internal"], false),
        ("billing", &[], true),
        ("billing-2", &["billing.internal"], false),
    ];
    let mut denied = 0;
    for (cn, sans, admitted) in table {
        let (config, cert_pem, key_pem) = pki.issue_client(cn, sans);
        let result = exchange(addr, config);
        if *admitted {
            assert!(
                result.is_ok(),
                "{cn} {sans:?}: {result:?}\n{}",
                agent.log_text()
            );
        } else {
            denied += 1;
            assert!(
                matches!(
                    result,
                    Err(rustls::Error::AlertReceived(AlertDescription::AccessDenied))
                ),
                "{cn} {sans:?} must get access_denied: {result:?}"
            );
            // openssl sees the same alert.
            if let Some(openssl) = &openssl {
                let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
                std::fs::write(&cert, cert_pem).expect("write cert");
                std::fs::write(&key, key_pem).expect("write key");
                let (cert, key) = (cert.display().to_string(), key.display().to_string());
                let (_, text) = scan(
                    openssl,
                    addr,
                    &files,
                    &["-ign_eof", "-cert", &cert, "-key", &key],
                );
                assert!(
                    text.contains("access denied"),
                    "{cn}: s_client said\n{text}"
                );
                denied += 1;
            }
        }
    }
    // One counter by listener and reason (no identity label), one line per connection that
    // names who was refused.
    eventually(Duration::from_secs(10), "the refusals counted", || {
        tlsplice_tests::metric(
            &agent.metrics(),
            "tlsplice_connections_total",
            &["listener=\"web\"", "outcome=\"client not allowed\""],
        ) >= f64::from(denied)
    });
    let log = agent.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("outcome=client not allowed") || l.contains("outcome=\"client not allowed\"")
        })
        .collect();
    assert_eq!(lines.len(), denied as usize, "{log}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("URI:spiffe://mesh.test/ns/ab/sa/web")),
        "the refused identity is in its line:\n{log}"
    );
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn allow_servers_checks_who_the_upstream_is_beyond_its_name() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream = tlsplice_tests::ops::tls_echo_upstream(&pki);
    // The upstream's certificate is for "localhost" (a DNS SAN, no CN).
    for (allow, admitted) in [("dns:localhost", true), ("spiffe://mesh.test/ns/db", false)] {
        let mut l = listener(Mode::Reencrypt, &dir, upstream, DataPathPolicy::Auto);
        if let Some(u) = &mut l.upstream_tls {
            u.allow_servers = vec![allow.to_owned().try_into().expect("pattern")];
        }
        let mut agent = Agent::start(l);
        let result = exchange(agent.addr, pki.client_config());
        let report = agent.next_report();
        if admitted {
            assert!(result.is_ok(), "{allow}: {result:?} {report:?}");
            assert_eq!(report.outcome, Reason::Ok, "{report:?}");
        } else {
            assert!(result.is_err(), "{allow}: the client must not get through");
            assert_eq!(report.outcome, Reason::UpstreamNotAllowed, "{report:?}");
            let error = report.error.unwrap_or_default();
            assert!(error.contains("DNS:localhost"), "{error}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn node_flags_set_the_default_policy_and_check_names_the_key_at_fault() {
    const TEST: &str = "node_flags_set_the_default_policy_and_check_names_the_key_at_fault";
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let files = pki.write_files();
    let dir = test_dir("policy-flags");
    let (web, legacy) = (tlsplice_tests::free_port(), tlsplice_tests::free_port());
    let config = format!(
        "{}{}[listener.tls]\ntls_versions = [\"1.2\", \"1.3\"]\n",
        tlsplice_tests::ops::terminate_listener("web", web, echo_upstream(), &files),
        tlsplice_tests::ops::terminate_listener("legacy", legacy, echo_upstream(), &files),
    );
    // TLS 1.3 only for the node; the "legacy" listener says otherwise for itself.
    let agent = AgentProcess::start_with_env(
        &dir,
        &config,
        &[("TLSPLICE_TLS_VERSIONS", "1.3")],
        &["--tls-groups", "X25519,P-256"],
    );
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    assert!(!scan(&openssl, at(web), &files, &["-tls1_2"]).0);
    assert!(scan(&openssl, at(web), &files, &["-tls1_3"]).0);
    assert!(scan(&openssl, at(legacy), &files, &["-tls1_2"]).0);
    assert!(agent.stop().success());

    // `tlsplice check` on the "web" listener with `tls` as its [listener.tls] table: whether
    // it passed, and what it said.
    let path = dir.join("check.toml");
    let check = |tls: &str| {
        let text = format!(
            "{}[listener.tls]\n{tls}",
            tlsplice_tests::ops::terminate_listener("web", web, echo_upstream(), &files),
        );
        std::fs::write(&path, text).expect("write config");
        let out = std::process::Command::new(tlsplice_tests::agent_binary())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("tlsplice check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Policies that cannot be served are refused, naming listener and key: a TLS 1.2 suite
    // with TLS 1.3 alone; the post-quantum group alone with TLS 1.2 still allowed (the
    // default), which leaves TLS 1.2 no group.
    #[rustfmt::skip]
    let refused: &[(&str, &[&str])] = &[
        ("tls_versions = [\"1.3\"]\ncipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n", &["cipher_suites", "TLS 1.2"]),
        ("groups = [\"X25519MLKEM768\"]\n", &["groups", "X25519MLKEM768 is TLS 1.3 only"]),
    ];
    for (tls, words) in refused {
        let (ok, stderr) = check(tls);
        assert!(!ok, "{tls}: {stderr}");
        assert!(stderr.contains("listener \"web\""), "{stderr}");
        for w in *words {
            assert!(stderr.contains(w), "{tls}: no {w:?} in {stderr}");
        }
    }
    // Post-quantum only with TLS 1.3 alone can be served.
    let (ok, stderr) = check("groups = [\"X25519MLKEM768\"]\ntls_versions = [\"1.3\"]\n");
    assert!(ok, "{stderr}");
}

/// The metric families a PromQL text uses (`tlsplice_...`, histogram and counter suffixes
/// kept: they are what /metrics shows).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tlsplice_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    // Not metrics: the dashboard's uid and tag.
    names.retain(|n| n != "tlsplice_" && !n.starts_with("tlsplice_node"));
    names
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn alert_rules_and_dashboard_use_only_metrics_a_live_agent_exports_and_the_histograms_move() {
    const TEST: &str =
        "alert_rules_and_dashboard_use_only_metrics_a_live_agent_exports_and_the_histograms_move";
    const RULES: &str = include_str!("../../deploy/monitoring/tlsplice-alerts.yaml");
    const DASHBOARD: &str = include_str!("../../deploy/monitoring/tlsplice-dashboard.json");
    // openssl makes the OCSP response whose gauge one rule watches.
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let files = pki.write_files();
    let dir = test_dir("policy-signals");
    let staple = dir.join("server.ocsp");
    std::fs::write(&staple, ocsp_response(&openssl, &files, "server.pem", 'V'))
        .expect("write staple");
    let (port, mesh_port) = (tlsplice_tests::free_port(), tlsplice_tests::free_port());
    // Beside it a reencrypt listener, whose upstream leg the dashboard counts by group too.
    let config = format!(
        "{}ocsp = \"{}\"\n\n[[listener]]\nname = \"mesh\"\nmode = \"reencrypt\"\n\
         listen = \"127.0.0.1:{mesh_port}\"\nupstream = \"{}\"\ncert = \"{f}/server.pem\"\n\
         key = \"{f}/server.key\"\n[listener.upstream_tls]\nserver_name = \"localhost\"\n\
         ca = \"{f}/ca.pem\"\n",
        tlsplice_tests::ops::terminate_listener("web", port, echo_upstream(), &files),
        staple.display(),
        tlsplice_tests::ops::tls_echo_upstream(&pki),
        f = files.display()
    );
    let agent = AgentProcess::start(&dir, &config, &[], &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let count = |text: &str, kind: &str| {
        tlsplice_tests::metric(
            text,
            "tlsplice_handshake_duration_seconds_count",
            &["listener=\"web\"", &format!("kind=\"{kind}\"")],
        )
    };
    // A full handshake, then a resumed one (same client configuration), then more; X25519.
    let config = offering(&pki, &[rustls::crypto::aws_lc_rs::kx_group::X25519]);
    for round in 1..=3u32 {
        exchange(addr, config.clone()).expect("exchange");
        eventually(Duration::from_secs(10), "the connection recorded", || {
            tlsplice_tests::metric(
                &agent.metrics(),
                "tlsplice_connections_total",
                &["listener=\"web\"", "outcome=\"ok\""],
            ) >= f64::from(round)
        });
    }
    exchange(
        std::net::SocketAddr::from(([127, 0, 0, 1], mesh_port)),
        pki.client_config(),
    )
    .expect("exchange through the reencrypt listener");
    eventually(
        Duration::from_secs(10),
        "the mesh connection recorded",
        || {
            tlsplice_tests::metric(
                &agent.metrics(),
                "tlsplice_connections_total",
                &["listener=\"mesh\"", "outcome=\"ok\""],
            ) >= 1.0
        },
    );
    let text = agent.metrics();
    // The agent's own upstream leg offers the post-quantum hybrid first, and rustls takes it.
    assert_eq!(
        tlsplice_tests::metric(
            &text,
            "tlsplice_upstream_handshakes_total",
            &[
                "listener=\"mesh\"",
                "outcome=\"ok\"",
                "group=\"X25519MLKEM768\""
            ]
        ),
        1.0,
        "{text}"
    );
    // Handshakes by group: the client offered X25519 alone.
    assert_eq!(
        tlsplice_tests::metric(
            &text,
            "tlsplice_handshakes_total",
            &["listener=\"web\"", "outcome=\"ok\"", "group=\"X25519\""]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(count(&text, "full"), 1.0, "{text}");
    assert_eq!(count(&text, "resumed"), 2.0, "{text}");
    assert!(
        tlsplice_tests::metric(
            &text,
            "tlsplice_connection_duration_seconds_count",
            &["listener=\"web\""]
        ) >= 3.0,
        "{text}"
    );
    let mut used = metric_names(RULES);
    used.extend(metric_names(DASHBOARD));
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            !text.lines().any(|l| {
                !l.starts_with('#')
                    && l.starts_with(name.as_str())
                    && l[name.len()..].starts_with(['{', ' '])
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "used by the rules or the dashboard, not at /metrics: {missing:?}\n{text}"
    );
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_client_revoked_by_a_new_crl_is_refused_without_a_restart() {
    let pki = TestPki::generate();
    let files = pki.write_files();
    let dir = test_dir("policy-crl");
    let crl = dir.join("clients.crl.pem");
    std::fs::write(&crl, pki.crl(1, &[])).expect("write CRL");
    let port = tlsplice_tests::free_port();
    let config = format!(
        "[certs]\nreload_interval_ms = 200\n{}client_ca = \"{ca}\"\nclient_crls = [\"{crl}\"]\n",
        tlsplice_tests::ops::terminate_listener("web", port, echo_upstream(), &files),
        ca = files.join("ca.pem").display(),
        crl = crl.display(),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (alice, _, _) = pki.issue_client_serial("alice", &["alice.internal"], 4001);
    let (bob, _, _) = pki.issue_client_serial("bob", &["bob.internal"], 4002);
    exchange(addr, alice.clone()).expect("alice before the revocation");
    exchange(addr, bob.clone()).expect("bob before the revocation");
    // Alice's certificate is revoked: the new CRL is picked up from the file, no restart.
    std::fs::write(&crl, pki.crl(2, &[4001])).expect("write the new CRL");
    eventually(Duration::from_secs(15), "alice refused", || {
        exchange(addr, alice.clone()).is_err()
    });
    let refused = exchange(addr, alice).expect_err("alice after the revocation");
    assert!(
        matches!(
            refused,
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked)
        ),
        "{refused:?}"
    );
    exchange(addr, bob).expect("bob is not revoked");
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("outcome=\"certificate refused\"")
                || l.contains("outcome=certificate refused")),
        "{log}"
    );
    assert!(agent.stop().success());
}

/// An OCSP response from the test CA for `cert` (a file in `files`, e.g. server.pem), saying
/// `status` ("V" good, "R" revoked), made with `openssl ocsp`; DER.
fn ocsp_response(
    openssl: &std::path::Path,
    files: &std::path::Path,
    cert: &str,
    status: char,
) -> Vec<u8> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(openssl)
            .args(args)
            .current_dir(files)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let serial = run(&["x509", "-in", cert, "-noout", "-serial"]);
    let serial = serial.trim_start_matches("serial=");
    let subject = run(&[
        "x509", "-in", cert, "-noout", "-subject", "-nameopt", "compat",
    ]);
    let subject = subject.trim_start_matches("subject=");
    let revoked = if status == 'R' { "260601000000Z" } else { "" };
    std::fs::write(
        files.join("index.txt"),
        format!("{status}\t351231000000Z\t{revoked}\t{serial}\tunknown\t{subject}\n"),
    )
    .expect("write index");
    run(&[
        "ocsp",
        "-issuer",
        "ca.pem",
        "-cert",
        cert,
        "-no_nonce",
        "-reqout",
        "req.der",
    ]);
    run(&[
        "ocsp",
        "-index",
        "index.txt",
        "-rsigner",
        "ca.pem",
        "-rkey",
        "ca.key",
        "-CA",
        "ca.pem",
        "-reqin",
        "req.der",
        "-respout",
        "resp.der",
        "-ndays",
        "1",
    ]);
    std::fs::read(files.join("resp.der")).expect("read the response")
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_good_ocsp_response_is_stapled_and_an_unusable_one_is_not() {
    const TEST: &str = "a_good_ocsp_response_is_stapled_and_an_unusable_one_is_not";
    let Some(openssl) = tool_or_skip(TEST, "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let files = pki.write_files();
    let dir = test_dir("policy-ocsp");
    let staple = dir.join("server.ocsp");
    std::fs::write(&staple, ocsp_response(&openssl, &files, "server.pem", 'V'))
        .expect("write staple");
    let port = tlsplice_tests::free_port();
    let config = format!(
        "[certs]\nreload_interval_ms = 200\n{}ocsp = \"{}\"\n",
        tlsplice_tests::ops::terminate_listener("web", port, echo_upstream(), &files),
        staple.display(),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stale = || {
        tlsplice_tests::metric(
            &agent.metrics(),
            "tlsplice_ocsp_response_stale",
            &["listener=\"web\""],
        )
    };
    let (done, text) = scan_status(&openssl, addr, &files);
    assert!(done, "{text}");
    assert!(
        text.contains("OCSP Response Status: successful") && text.contains("Cert Status: good"),
        "the staple is missing:\n{text}\n{}",
        agent.log_text()
    );
    assert_eq!(stale(), 0.0);
    // A response for another certificate (one left from before a rotation): not stapled.
    std::fs::write(&staple, ocsp_response(&openssl, &files, "client.pem", 'V'))
        .expect("write staple");
    eventually(
        Duration::from_secs(15),
        "the other certificate's response dropped",
        || stale() == 1.0,
    );
    let (done, text) = scan_status(&openssl, addr, &files);
    assert!(
        done && text.contains("OCSP response: no response sent"),
        "{text}"
    );
    assert!(
        agent
            .log_text()
            .contains("no response for this certificate's serial number"),
        "{}",
        agent.log_text()
    );
    std::fs::write(&staple, ocsp_response(&openssl, &files, "server.pem", 'V'))
        .expect("write staple");
    eventually(Duration::from_secs(15), "the good response back", || {
        stale() == 0.0
    });
    // The node's fetcher writes a response that says "revoked": not stapled, and the gauge
    // says so, without a restart.
    std::fs::write(&staple, ocsp_response(&openssl, &files, "server.pem", 'R'))
        .expect("write staple");
    eventually(
        Duration::from_secs(15),
        "the unusable response dropped",
        || stale() == 1.0,
    );
    let (done, text) = scan_status(&openssl, addr, &files);
    assert!(done, "{text}");
    assert!(text.contains("OCSP response: no response sent"), "{text}");
    assert!(
        agent.log_text().contains("OCSP response cannot be stapled"),
        "{}",
        agent.log_text()
    );
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn two_nodes_carry_mtls_between_namespaces_and_refuse_a_third_identity() {
    use tlsplice_tests::{Netns, PacketCapture, expect_pattern, ip, send_pattern};
    const TEST: &str = "two_nodes_carry_mtls_between_namespaces_and_refuse_a_third_identity";
    const LEN: usize = 2 << 20;
    if tool_or_skip(TEST, "ip").is_none() {
        return;
    }
    let pki = TestPki::generate();
    let files = pki.write_files();
    let (node_a, node_b) = (Netns::new("node-a"), Netns::new("node-b"));
    let tag = std::process::id() % 100_000;
    let (if_a, if_b) = (format!("tpa{tag}"), format!("tpb{tag}"));
    ip(&["link", "add", &if_a, "type", "veth", "peer", "name", &if_b]);
    ip(&["link", "set", &if_a, "netns", &node_a.name]);
    ip(&["link", "set", &if_b, "netns", &node_b.name]);
    ip(&[
        "-n",
        &node_a.name,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        &if_a,
    ]);
    ip(&[
        "-n",
        &node_b.name,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        &if_b,
    ]);
    ip(&["-n", &node_a.name, "link", "set", &if_a, "up"]);
    ip(&["-n", &node_b.name, "link", "set", &if_b, "up"]);

    // Node B: a local plaintext app behind a terminate listener that admits node A's
    // workload identity only.
    let app_b = node_b.run(echo_upstream);
    let dir = test_dir("policy-two-nodes");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let port_b = tlsplice_tests::free_port();
    let config_b = format!(
        "[[listener]]\nname = \"mesh-in\"\nmode = \"terminate\"\nlisten = \"10.77.0.2:{port_b}\"\n\
         upstream = \"{app_b}\"\ncert = \"{f}/server.pem\"\nkey = \"{f}/server.key\"\n\
         client_ca = \"{f}/ca.pem\"\nallow_clients = [\"spiffe://mesh.test/ns/a\"]\n",
        f = files.display()
    );
    // Node A: originate listeners for its local apps, one presenting A's identity and one a
    // third workload's.
    let (_, a_cert, a_key) = pki.issue_client("node-a", &["spiffe://mesh.test/ns/a/sa/app"]);
    let (_, c_cert, c_key) = pki.issue_client("node-c", &["spiffe://mesh.test/ns/c/sa/app"]);
    let (port_a, port_c) = (tlsplice_tests::free_port(), tlsplice_tests::free_port());
    let originate = |name: &str, port: u16, cert: &str, key: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nmode = \"originate\"\nlisten = \"127.0.0.1:{port}\"\n\
             upstream = \"10.77.0.2:{port_b}\"\n[listener.upstream_tls]\nserver_name = \"localhost\"\n\
             ca = \"{f}/ca.pem\"\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\n",
            f = files.display()
        )
    };
    let config_a = format!(
        "{}{}",
        originate(
            "to-b",
            port_a,
            &write("a.pem", &a_cert),
            &write("a.key", &a_key)
        ),
        originate(
            "as-c",
            port_c,
            &write("c.pem", &c_cert),
            &write("c.key", &c_key)
        ),
    );
    let agent_b = AgentProcess::start(&dir, &config_b, &node_b.exec(), &[]);
    let agent_a = AgentProcess::start(&dir, &config_a, &node_a.exec(), &[]);
    let capture = PacketCapture::start(&node_b, &if_b);

    // A control: plaintext sent across the veth is seen by the capture.
    const CONTROL: &[u8] = b"tlsplice capture control: plaintext on the wire";
    let control = node_b.run(|| std::net::TcpListener::bind("10.77.0.2:0").expect("bind"));
    let control_addr = control.local_addr().expect("addr");
    node_a.run(|| {
        let mut s = std::net::TcpStream::connect(control_addr).expect("connect across the veth");
        s.write_all(CONTROL).expect("write");
    });
    let mut got = vec![0u8; CONTROL.len()];
    control
        .accept()
        .expect("accept")
        .0
        .read_exact(&mut got)
        .expect("read");

    // Node A's app sends through A, across the veth, through B to B's app and back.
    let local =
        node_a.run(|| std::net::TcpStream::connect(("127.0.0.1", port_a)).expect("connect"));
    local
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = local.try_clone().expect("clone");
    let sending = std::thread::spawn(move || send_pattern(&mut writer, 9, LEN));
    let mut reader = local.try_clone().expect("clone");
    expect_pattern(&mut reader, 9, LEN).expect("the echo through both nodes");
    sending.join().expect("writer").expect("send");
    local.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty());

    // The third identity is refused by B: its app's connection ends without an echo.
    let refused =
        node_a.run(|| std::net::TcpStream::connect(("127.0.0.1", port_c)).expect("connect"));
    refused
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _ = (&refused).write_all(b"must not reach node B's app");
    let mut back = Vec::new();
    let _ = (&refused).read_to_end(&mut back);
    assert!(
        back.is_empty(),
        "the refused identity got {} bytes back",
        back.len()
    );

    let wire = capture.finish();
    assert!(
        tlsplice_tests::contains(&wire, CONTROL),
        "the capture sees plaintext"
    );
    assert!(wire.len() > LEN, "captured {} bytes", wire.len());
    for sample in tlsplice_tests::pattern_samples(9, LEN) {
        assert!(
            !tlsplice_tests::contains(&wire, &sample),
            "plaintext on the veth"
        );
    }
    let closed = |agent: &AgentProcess, listener: &str, what: &str| {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains(&format!("listener={listener} ")) && l.contains(what))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(20), "both nodes' lines", || {
        !closed(&agent_a, "to-b", "connection closed").is_empty()
            && !closed(&agent_b, "mesh-in", "connection closed").is_empty()
            && !closed(&agent_b, "mesh-in", "client not allowed").is_empty()
    });
    let (a_line, b_line) = (
        closed(&agent_a, "to-b", "connection closed").remove(0),
        closed(&agent_b, "mesh-in", "connection closed").remove(0),
    );
    assert!(
        b_line.contains("URI:spiffe://mesh.test/ns/a/sa/app"),
        "{b_line}"
    );
    let denied = closed(&agent_b, "mesh-in", "client not allowed").remove(0);
    assert!(
        denied.contains("URI:spiffe://mesh.test/ns/c/sa/app"),
        "{denied}"
    );
    // Neither node sets groups: the hop between them is post-quantum.
    assert!(
        a_line.contains("upstream TLSv1.3") && a_line.contains("X25519MLKEM768"),
        "{a_line}"
    );
    assert!(
        b_line.contains("client TLSv1.3") && b_line.contains("X25519MLKEM768"),
        "{b_line}"
    );
    if tlsplice_tests::in_guest() {
        // Both TLS legs, A's upstream and B's client, on kTLS.
        assert!(a_line.contains("data_path=ktls"), "{a_line}");
        assert!(b_line.contains("data_path=ktls"), "{b_line}");
    }
    println!("node A: {a_line}\nnode B: {b_line}\nrefused: {denied}");
    let _ = (agent_a.stop(), agent_b.stop());
}
