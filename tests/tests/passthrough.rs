//! SNI passthrough end to end: the agent routes by the ClientHello's server name without
//! decrypting, and the client's TLS session reaches the chosen upstream untouched (the client
//! verifies that upstream's own certificate). Plain legs: spliced in the kernel, or copied in
//! user space when the listener asks. Runs on the host and in every guest.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConfig, ServerConnection, StreamOwned};
use tlsplice::config::{DataPathPolicy, ListenerConfig, Mode};
use tlsplice::outcome::{DataPath, Reason};
use tlsplice_tests::{Agent, TestPki, expect_pattern, send_pattern};

const BULK: usize = 16 << 20;

/// A TLS upstream that reads `len` bytes of pattern 1, answers `len` bytes of pattern 2 and
/// then a close_notify; returns the server name the client asked it for.
fn upstream(config: Arc<ServerConfig>, len: usize) -> (SocketAddr, thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (sock, _) = listener.accept().expect("accept");
        let conn = ServerConnection::new(config).expect("server");
        let mut tls = StreamOwned::new(conn, sock);
        expect_pattern(&mut tls, 1, len).expect("upstream receiving");
        send_pattern(&mut tls, 2, len).expect("upstream sending");
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest)
            .expect("close_notify from the client");
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        tls.conn.server_name().unwrap_or_default().to_owned()
    });
    (addr, handle)
}

fn passthrough_listener(
    routes: &[(&str, SocketAddr)],
    default: Option<SocketAddr>,
    data_path: DataPathPolicy,
) -> ListenerConfig {
    ListenerConfig {
        name: "test".into(),
        mode: Mode::Passthrough,
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream: default,
        upstream_unix: None,
        sni: routes.iter().map(|(n, a)| ((*n).to_owned(), *a)).collect(),
        cert: None,
        key: None,
        client_ca: None,
        upstream_tls: None,
        proxy_protocol: None,
        alpn: vec![],
        handshake_timeout_ms: 2_000,
        connect_timeout_ms: 5_000,
        data_path,
        rekey_after_records: None,
        certs: vec![],
        max_connections: None,
        per_source_connections: None,
        per_source_handshakes_per_second: None,
        per_source_handshake_burst: None,
        idle_timeout_ms: 3_600_000,
        allow_clients: vec![],
        client_crls: vec![],
        ocsp: None,
        tls: Default::default(),
        effective_tls: Default::default(),
    }
}

/// A TLS client for `name` trusting `pki`, through the agent: pattern 1 up, pattern 2 down.
fn client_exchange(agent: SocketAddr, pki: &TestPki, name: &str, len: usize) {
    let sock = TcpStream::connect(agent).expect("connect");
    let server_name = ServerName::try_from(name.to_owned()).expect("name");
    let conn = ClientConnection::new(pki.client_config(), server_name).expect("client");
    let mut tls = StreamOwned::new(conn, sock);
    send_pattern(&mut tls, 1, len).expect("client sending");
    expect_pattern(&mut tls, 2, len).expect("client receiving");
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest)
        .expect("close_notify from the upstream");
}

fn routes_by_server_name(data_path: DataPathPolicy, expected: DataPath) {
    let pki_a = TestPki::generate_for(&["a.test"]);
    let pki_b = TestPki::generate_for(&["b.test"]);
    let (addr_a, _never_a) = upstream(pki_a.server_config(), 1);
    let (addr_b, done_b) = upstream(pki_b.server_config(), BULK);
    let mut agent = Agent::start(passthrough_listener(
        &[("A.test", addr_a), ("b.test", addr_b)],
        None,
        data_path,
    ));
    // b.test's certificate verifies only if the session really reached upstream b.
    client_exchange(agent.addr, &pki_b, "b.test", BULK);
    assert_eq!(done_b.join().expect("upstream b"), "b.test");
    let report = agent.next_report();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.data_path, Some(expected), "{report:?}");
    assert_eq!(report.session, "SNI b.test");
    assert!(
        report.path_reason.contains(&addr_b.to_string()),
        "{report:?}"
    );
    // Ciphertext bytes: at least the payload, plus TLS overhead.
    assert!(
        report.bytes_up > BULK as u64 && report.bytes_down > BULK as u64,
        "{report:?}"
    );
    println!(
        "passthrough: {} MiB each way to b.test over {expected} ({} bytes up, {} down)",
        BULK >> 20,
        report.bytes_up,
        report.bytes_down
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn routes_by_server_name_and_splices() {
    routes_by_server_name(DataPathPolicy::Auto, DataPath::Splice);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn forced_userspace_copies() {
    routes_by_server_name(DataPathPolicy::Userspace, DataPath::Userspace);
}

/// Connects, sends `bytes`, and returns what came back before the agent closed.
fn refused(agent: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut sock = TcpStream::connect(agent).expect("connect");
    sock.write_all(bytes).expect("write");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer)
        .expect("the agent closes the connection cleanly");
    answer
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn bad_first_flights_are_refused_with_a_reason() {
    let never = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut agent = Agent::start(passthrough_listener(
        &[("known.test", never.local_addr().expect("addr"))],
        None,
        DataPathPolicy::Auto,
    ));
    // Unknown server name, and no default route.
    let hello = {
        let pki = TestPki::generate_for(&["unknown.test"]);
        let name = ServerName::try_from("unknown.test").expect("name");
        let mut conn = ClientConnection::new(pki.client_config(), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("ClientHello");
        out
    };
    assert!(refused(agent.addr, &hello).is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::UnknownSni, "{report:?}");
    assert_eq!(report.data_path, None);
    // Plaintext instead of TLS.
    assert!(refused(agent.addr, b"GET / HTTP/1.1\r\n\r\n").is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::NotTls, "{report:?}");
    // A record header announcing more than a ClientHello may be.
    assert!(refused(agent.addr, &[22, 3, 1, 0xff, 0xff, 1]).is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::OversizedClientHello, "{report:?}");
    // Half a ClientHello, then silence: the handshake timeout (2 s here) ends it.
    assert!(refused(agent.addr, &hello[..hello.len() / 2]).is_empty());
    let report = agent.next_report();
    assert_eq!(report.outcome, Reason::HandshakeTimeout, "{report:?}");
    never.set_nonblocking(true).expect("nonblocking");
    assert!(never.accept().is_err(), "no upstream may be contacted");
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn proxy_v2_header_precedes_the_client_hello() {
    let pki = TestPki::generate_for(&["b.test"]);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let config = pki.server_config();
    // Reads the PROXY v2 header, then serves the client's own TLS session behind it.
    let upstream_done = thread::spawn(move || -> Result<(SocketAddr, usize), String> {
        let (mut sock, _) = l.accept().map_err(|e| e.to_string())?;
        let mut header = vec![0u8; 16];
        sock.read_exact(&mut header).map_err(|e| e.to_string())?;
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        header.resize(16 + len, 0);
        sock.read_exact(&mut header[16..])
            .map_err(|e| e.to_string())?;
        let parsed = ppp::v2::Header::try_from(header.as_slice()).map_err(|e| format!("{e:?}"))?;
        let source = match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => SocketAddr::from((a.source_address, a.source_port)),
            other => return Err(format!("{other:?}")),
        };
        let tlvs = parsed.tlvs().count();
        let mut tls = StreamOwned::new(
            ServerConnection::new(config).map_err(|e| e.to_string())?,
            sock,
        );
        expect_pattern(&mut tls, 1, 4096).map_err(|e| e.to_string())?;
        send_pattern(&mut tls, 2, 4096).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok((source, tlvs))
    });
    let mut cfg = passthrough_listener(&[("b.test", addr)], None, DataPathPolicy::Auto);
    cfg.proxy_protocol = Some(tlsplice::config::ProxyProtocol::V2);
    let mut agent = Agent::start(cfg);
    client_exchange(agent.addr, &pki, "b.test", 4096);
    let (source, tlvs) = upstream_done.join().expect("upstream").expect("upstream");
    let report = agent.next_report();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(source, report.peer, "the header names the client");
    assert_eq!(tlvs, 0, "passthrough holds no TLS session to describe");
}
