//! Client certificates (mTLS) on terminate and reencrypt listeners, ALPN, and the PROXY protocol
//! header that tells the upstream who the client is.
//!
//! Runs on every kernel of the matrix, over the best data path (kTLS in the guests, user space on
//! the host). The upstreams here read the PROXY header byte by byte, exactly as far as it goes,
//! and parse it with the `ppp` crate; then the ordinary traffic (plaintext, or the upstream TLS
//! handshake in reencrypt mode) must follow it unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use rustls::{ClientConfig, ServerConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, ListenerConfig, Mode, ProxyProtocol};
use tlsplice::outcome::{ConnectionReport, Reason};
use tlsplice_tests::{
    Agent, CLIENT_CN, CLIENT_SANS, TestPki, expect_pattern, expected_auto_path, listener, s_client,
    send_pattern, tls_client, tool_or_skip,
};

/// Bytes each way in the exchanges here (the bulk tests live in terminate/reencrypt).
const LEN: usize = 1 << 20;

/// A PROXY v2 header as an upstream saw it.
#[derive(Debug)]
struct SeenV2 {
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: Vec<(u8, Vec<u8>)>,
}

impl SeenV2 {
    fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// PP2_TYPE_SSL split into (client flags, verify, sub-TLVs).
    fn ssl(&self) -> (u8, u32, Vec<(u8, Vec<u8>)>) {
        let v = self.tlv(0x20).expect("PP2_TYPE_SSL present");
        let verify = u32::from_be_bytes(v[1..5].try_into().expect("verify"));
        let mut sub = Vec::new();
        let mut rest = &v[5..];
        while !rest.is_empty() {
            let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
            sub.push((rest[0], rest[3..3 + len].to_vec()));
            rest = &rest[3 + len..];
        }
        (v[0], verify, sub)
    }
}

/// Reads exactly one PROXY v2 header from `sock` and parses it.
fn read_v2(sock: &mut TcpStream) -> Result<SeenV2, String> {
    let mut head = [0u8; 16];
    sock.read_exact(&mut head)
        .map_err(|e| format!("reading the PROXY v2 prefix: {e}"))?;
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut whole = head.to_vec();
    whole.resize(16 + len, 0);
    sock.read_exact(&mut whole[16..])
        .map_err(|e| format!("reading the PROXY v2 body: {e}"))?;
    let header = ppp::v2::Header::try_from(whole.as_slice()).map_err(|e| format!("{e:?}"))?;
    let (source, destination) = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        other => return Err(format!("unexpected addresses {other:?}")),
    };
    let tlvs = header
        .tlvs()
        .map(|t| t.map(|t| (t.kind, t.value.to_vec())))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("TLV: {e:?}"))?;
    Ok(SeenV2 {
        source,
        destination,
        tlvs,
    })
}

/// Reads one PROXY v1 line, byte by byte so nothing after it is consumed.
fn read_v1(sock: &mut TcpStream) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        sock.read_exact(&mut byte)
            .map_err(|e| format!("reading the PROXY v1 line: {e}"))?;
        line.push(byte[0]);
        if line.len() > 107 {
            return Err("PROXY v1 line longer than 107 bytes".into());
        }
    }
    String::from_utf8(line).map_err(|e| e.to_string())
}

/// A plaintext upstream that reads a PROXY v2 header, then `LEN` bytes of pattern 1, answers
/// with `LEN` bytes of pattern 2 and closes.
fn v2_plain_upstream() -> (SocketAddr, thread::JoinHandle<Result<SeenV2, String>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let seen = read_v2(&mut s)?;
        expect_pattern(&mut s, 1, LEN).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut s, 2, LEN).map_err(|e| format!("upstream sending: {e}"))?;
        Ok(seen)
    });
    (addr, handle)
}

fn mtls_listener(mode: Mode, pki_dir: &std::path::Path, upstream: SocketAddr) -> ListenerConfig {
    let mut l = listener(mode, pki_dir, upstream, DataPathPolicy::Auto);
    l.client_ca = Some(pki_dir.join("ca.pem"));
    l.proxy_protocol = Some(ProxyProtocol::V2);
    l
}

/// Our rustls client through the agent: pattern 1 up, pattern 2 down, close_notify.
fn client_exchange(agent: SocketAddr, config: Arc<ClientConfig>) -> (TcpStream, Option<Vec<u8>>) {
    let mut tls = tls_client(agent, config);
    let local = tls.sock.try_clone().expect("clone");
    send_pattern(&mut tls, 1, LEN).expect("client sending");
    expect_pattern(&mut tls, 2, LEN).expect("client receiving");
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    (local, alpn)
}

fn check_report(report: &ConnectionReport) {
    let (path, reason) = expected_auto_path();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.data_path, Some(path), "{report:?}");
    if let Some(reason) = reason {
        assert!(report.path_reason.contains(&reason), "{report:?}");
    }
    assert_eq!(report.bytes_up, LEN as u64, "{report:?}");
    assert_eq!(report.bytes_down, LEN as u64, "{report:?}");
    let identity = format!("CN={CLIENT_CN} SAN={}", CLIENT_SANS.join(","));
    assert_eq!(
        report.client_identity.as_deref(),
        Some(identity.as_str()),
        "{report:?}"
    );
}

fn check_verified_ssl_tlv(seen: &SeenV2) {
    let (client, verify, sub) = seen.ssl();
    assert_eq!(client, 0x07, "SSL + CERT_CONN + CERT_SESS: {seen:?}");
    assert_eq!(verify, 0, "verified: {seen:?}");
    let sub_value = |kind: u8| {
        sub.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert!(
        matches!(sub_value(0x21).as_deref(), Some("TLSv1.3" | "TLSv1.2")),
        "{sub:?}"
    );
    assert!(
        sub_value(0x23).is_some_and(|c| c.starts_with("TLS_")),
        "{sub:?}"
    );
    assert_eq!(sub_value(0x22).as_deref(), Some(CLIENT_CN), "{sub:?}");
    let sans: Vec<String> = seen
        .tlvs
        .iter()
        .filter(|(k, _)| *k == 0xE0)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(sans, CLIENT_SANS, "{seen:?}");
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn terminate_mtls_identity_and_alpn_reach_the_upstream_in_proxy_v2() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (upstream, seen) = v2_plain_upstream();
    let mut l = mtls_listener(Mode::Terminate, &dir, upstream);
    l.alpn = vec!["h2".into(), "http/1.1".into()];
    let mut agent = Agent::start(l);
    let (client_sock, alpn) =
        client_exchange(agent.addr, pki.client_config_with_cert(&["http/1.1"]));
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]), "ALPN negotiated");
    let seen = seen.join().expect("upstream").expect("upstream");
    assert_eq!(seen.source, client_sock.local_addr().expect("client addr"));
    assert_eq!(seen.destination, agent.addr);
    assert_eq!(seen.tlv(0x01), Some(&b"http/1.1"[..]), "PP2_TYPE_ALPN");
    assert_eq!(
        seen.tlv(0x02),
        Some(&b"localhost"[..]),
        "PP2_TYPE_AUTHORITY"
    );
    check_verified_ssl_tlv(&seen);
    let report = agent.next_report();
    check_report(&report);
    assert!(report.session.contains("ALPN http/1.1"), "{report:?}");
    println!(
        "mtls terminate over {:?}: {} ({})",
        report.data_path,
        report.client_identity.unwrap_or_default(),
        report.session
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn reencrypt_mtls_sends_proxy_v2_before_the_upstream_handshake() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = l.local_addr().expect("addr");
    let server_config = pki.server_config();
    let seen = thread::spawn(move || -> Result<SeenV2, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let seen = read_v2(&mut s)?;
        let conn = ServerConnection::new(server_config).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, s);
        expect_pattern(&mut tls, 1, LEN).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut tls, 2, LEN).map_err(|e| format!("upstream sending: {e}"))?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok(seen)
    });
    let mut agent = Agent::start(mtls_listener(Mode::Reencrypt, &dir, upstream));
    let (client_sock, _) = client_exchange(agent.addr, pki.client_config_with_cert(&[]));
    let seen = seen.join().expect("upstream").expect("upstream");
    assert_eq!(seen.source, client_sock.local_addr().expect("client addr"));
    check_verified_ssl_tlv(&seen);
    assert_eq!(seen.tlv(0x01), None, "no ALPN was negotiated: {seen:?}");
    check_report(&agent.next_report());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn proxy_v1_carries_the_client_address_without_mtls() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = l.local_addr().expect("addr");
    let seen = thread::spawn(move || -> Result<String, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let line = read_v1(&mut s)?;
        expect_pattern(&mut s, 1, LEN).map_err(|e| format!("upstream receiving: {e}"))?;
        send_pattern(&mut s, 2, LEN).map_err(|e| format!("upstream sending: {e}"))?;
        Ok(line)
    });
    let mut cfg = listener(Mode::Terminate, &dir, upstream, DataPathPolicy::Auto);
    cfg.proxy_protocol = Some(ProxyProtocol::V1);
    let mut agent = Agent::start(cfg);
    let (client_sock, _) = client_exchange(agent.addr, pki.client_config());
    let client = client_sock.local_addr().expect("client addr");
    assert_eq!(
        seen.join().expect("upstream").expect("upstream"),
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            client.port(),
            agent.addr.port()
        )
    );
    let report = agent.next_report();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.client_identity, None, "{report:?}");
    assert_eq!(report.bytes_down, LEN as u64, "{report:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A client that finishes its side of the handshake and then tries to talk: with TLS 1.3 the
/// server's verdict on the client certificate arrives after the client's Finished, as an alert.
fn refused_client(agent: SocketAddr, config: Arc<ClientConfig>) -> String {
    let mut tls = tls_client(agent, config);
    let _ = tls.write_all(b"must not reach the upstream");
    let mut buf = Vec::new();
    match tls.read_to_end(&mut buf) {
        Ok(_) => {
            assert!(buf.is_empty(), "refused client got data");
            "EOF".into()
        }
        Err(e) => e.to_string(),
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn missing_or_untrusted_client_certificates_are_refused() {
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream_listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    upstream_listener
        .set_nonblocking(true)
        .expect("nonblocking");
    let upstream = upstream_listener.local_addr().expect("addr");
    let mut agent = Agent::start(mtls_listener(Mode::Terminate, &dir, upstream));

    let seen = refused_client(agent.addr, pki.client_config());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::CertificateRefused, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("peer sent no certificates"), "{report:?}");
    assert_eq!(report.data_path, None, "{report:?}");
    println!("no client certificate: client saw {seen:?}; agent: {error}");

    // A certificate from another CA, with the same names, from a client that trusts the agent.
    let stranger = TestPki::generate();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).expect("root");
    let stranger_config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![stranger.client_cert.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(stranger.client_key.clone().into()),
    )
    .expect("stranger's certificate");
    let seen = refused_client(agent.addr, Arc::new(stranger_config));
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::CertificateRefused, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    // Both test CAs share a name, so webpki finds the "issuer" and rejects its signature.
    assert!(error.contains("invalid peer certificate"), "{report:?}");
    println!("untrusted client certificate: client saw {seen:?}; agent: {error}");

    assert_eq!(
        upstream_listener.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock),
        "the upstream must never be contacted for a refused client"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn openssl_s_client_with_a_certificate_is_named_to_the_upstream() {
    let Some(openssl) = tool_or_skip("mtls openssl_s_client", "openssl") else {
        return;
    };
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let upstream = l.local_addr().expect("addr");
    // Answers with the common name the PROXY header carried.
    let upstream_done = thread::spawn(move || -> Result<String, String> {
        let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
        let seen = read_v2(&mut s)?;
        let (_, verify, sub) = seen.ssl();
        let cn = sub
            .iter()
            .find(|(k, _)| *k == 0x22)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        (&s).write_all(format!("pong {cn} verify={verify}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(line)
    });
    let mut agent = Agent::start(mtls_listener(Mode::Terminate, &dir, upstream));
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    let mut child = s_client(
        &openssl,
        agent.addr,
        &dir,
        &[
            "-quiet".as_ref(),
            "-cert".as_ref(),
            cert.as_ref(),
            "-key".as_ref(),
            key.as_ref(),
        ],
    );
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"ping\n").expect("write to s_client");
    let out = child.wait_with_output().expect("s_client output");
    drop(stdin);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("pong {CLIENT_CN} verify=0")),
        "s_client got {stdout:?}; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        upstream_done.join().expect("upstream").expect("upstream"),
        "ping\n"
    );
    let report = agent.next_report();
    let (path, _) = expected_auto_path();
    assert_eq!(report.data_path, Some(path), "{report:?}");
    assert!(
        report
            .client_identity
            .as_deref()
            .is_some_and(|c| c.starts_with(&format!("CN={CLIENT_CN}"))),
        "{report:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
