//! Counters in the pinned BPF maps, read by `tlsplice stats` and `/metrics`, equal the traffic
//! sent: connections accepted and closed (counted in the kernel by the sock_ops program),
//! connection and handshake outcomes, and bytes per data path (counted by the agent into the
//! same map). Without CAP_BPF the agent serves anyway and says why, everywhere.
//!
//! Passthrough over the sockmap data path (sock hash + stream verdict): byte-identical relay
//! of 64 MiB each way and of 1,000 concurrent short connections, exact counters, and no map
//! entry left behind after half-closes and resets.
//!
//! These tests run the agent binary, as an operator would.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tlsplice_tests::{
    AgentProcess, TestPki, agent_binary, bpffs_or_skip, expect_pattern, expected_auto_path,
    free_port, send_pattern, serve, tls_client, tool_or_skip,
};

/// Sum of the values of `family` whose labels include every pair in `with`.
fn sum(
    stats: &BTreeMap<(String, BTreeMap<String, String>), u64>,
    family: &str,
    with: &[(&str, &str)],
) -> u64 {
    stats
        .iter()
        .filter(|((name, labels), _)| {
            name == family
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// Upstream for the terminate listener: each connection sends an 8-byte header (up length,
/// down length, both u32 big-endian, the header counted in "up"), the rest of "up", then reads
/// "down" bytes until EOF.
fn sized_upstream() -> SocketAddr {
    serve(|mut sock| {
        let mut header = [0u8; 8];
        if sock.read_exact(&mut header).is_err() {
            return;
        }
        let up = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let down = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let mut rest = vec![0u8; up as usize - 8];
        if sock.read_exact(&mut rest).is_err() {
            return;
        }
        answer_and_finish(&mut sock, &vec![0x5a; down as usize]);
    })
}

/// Sends `answer` and a FIN, then reads to the client's FIN.
fn answer_and_finish(sock: &mut TcpStream, answer: &[u8]) {
    let _ = sock.write_all(answer);
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
}

/// Upstream that answers a ClientHello: reads `hello_len` bytes, sends `down` bytes and its
/// FIN, then reads to the client's FIN.
fn hello_upstream(hello_len: usize, down: usize) -> SocketAddr {
    serve(move |mut sock| {
        let mut hello = vec![0u8; hello_len];
        if sock.read_exact(&mut hello).is_ok() {
            answer_and_finish(&mut sock, &vec![0x3c; down]);
        }
    })
}

/// Upstream for the passthrough listener: reads to EOF, then answers `down` bytes and closes.
fn drain_upstream(down: usize) -> SocketAddr {
    serve(move |mut sock| {
        let mut sink = Vec::new();
        let _ = sock.read_to_end(&mut sink);
        let _ = sock.write_all(&vec![0xa5; down]);
    })
}

fn config(
    dir: &Path,
    term_port: u16,
    term_up: SocketAddr,
    pass_port: u16,
    pass_up: SocketAddr,
) -> String {
    format!(
        "[[listener]]\nname = \"term\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:{term_port}\"\n\
         upstream = \"{term_up}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
         [[listener]]\nname = \"pass\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:{pass_port}\"\n\
         upstream = \"{pass_up}\"\n",
        cert = dir.join("server.pem").display(),
        key = dir.join("server.key").display(),
    )
}

/// Polls `tlsplice stats` until `done` holds (connections end asynchronously), or 20 s pass.
fn settle(
    agent: &AgentProcess,
    done: impl Fn(&BTreeMap<(String, BTreeMap<String, String>), u64>) -> bool,
) -> BTreeMap<(String, BTreeMap<String, String>), u64> {
    // Generous: a loaded emulated guest has been seen to take over 20 s for the last reports
    // of 1,000 connections.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = agent.stats();
        if Instant::now() > deadline {
            return stats;
        }
        if done(&stats) {
            // The agent counts a connection's outcome after its other counters, but a read
            // walks the map while it changes: read once more now that every connection is in.
            std::thread::sleep(Duration::from_millis(200));
            return agent.stats();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn counters_in_pinned_maps_equal_the_traffic_sent() {
    let test = "counters_in_pinned_maps_equal_the_traffic_sent";
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (term_port, pass_port) = (free_port(), free_port());
    let term_up = sized_upstream();
    const PASS_DOWN: usize = 3_000;
    let pass_up = drain_upstream(PASS_DOWN);
    let agent = AgentProcess::start(
        &dir,
        &config(&dir, term_port, term_up, pass_port, pass_up),
        &[],
        &["--ebpf", "required", "--passthrough-path", "splice"],
    );
    let log = agent.log_text();
    assert!(log.contains("eBPF programs loaded"), "{log}");
    for map in [
        "TLSPLICE_STATS",
        "TLSPLICE_PORTS",
        "TLSPLICE_LISTENERS",
        "tlsplice_sockops",
    ] {
        assert!(agent.pin.join(map).exists(), "{map} not pinned");
    }
    let term = SocketAddr::from(([127, 0, 0, 1], term_port));
    let pass = SocketAddr::from(([127, 0, 0, 1], pass_port));

    // 20 TLS sessions through terminate, each with its own sizes.
    const TLS_CONNS: u32 = 20;
    let (mut want_up, mut want_down) = (0u64, 0u64);
    for i in 0..TLS_CONNS {
        let (up, down) = (1_000 + 37 * i, 2_000 + 101 * i);
        want_up += u64::from(up);
        want_down += u64::from(down);
        let mut tls = tls_client(term, pki.client_config());
        let mut msg = Vec::with_capacity(up as usize);
        msg.extend_from_slice(&up.to_be_bytes());
        msg.extend_from_slice(&down.to_be_bytes());
        msg.resize(up as usize, 0x11);
        tls.write_all(&msg).expect("send up");
        let mut got = Vec::new();
        tls.read_to_end(&mut got).expect("read down");
        assert_eq!(got.len(), down as usize);
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
    // 3 clients that do not speak TLS.
    const NOT_TLS: u64 = 3;
    for _ in 0..NOT_TLS {
        let mut s = TcpStream::connect(term).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // 5 passthrough connections: a real ClientHello plus filler, half-closed.
    let hello = pki.client_hello();
    const PASS_CONNS: u64 = 5;
    let mut pass_up_bytes = 0u64;
    for i in 0..PASS_CONNS {
        let mut s = TcpStream::connect(pass).expect("connect");
        let mut msg = hello.clone();
        msg.resize(hello.len() + 500 * (i as usize + 1), 0x22);
        pass_up_bytes += msg.len() as u64;
        s.write_all(&msg).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        assert_eq!(got.len(), PASS_DOWN);
    }
    // 2 passthrough clients that do not speak TLS.
    for _ in 0..2 {
        let mut s = TcpStream::connect(pass).expect("connect");
        s.write_all(b"\x00\x01garbage").expect("write");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }

    let term_total = u64::from(TLS_CONNS) + NOT_TLS;
    let pass_total = PASS_CONNS + 2;
    let stats = settle(&agent, |s| {
        sum(s, "tlsplice_connections_closed", &[("listener", "term")]) == term_total
            && sum(s, "tlsplice_connections_closed", &[("listener", "pass")]) == pass_total
            && sum(s, "tlsplice_connections", &[("listener", "term")]) == term_total
            && sum(s, "tlsplice_connections", &[("listener", "pass")]) == pass_total
    });
    for ((name, labels), value) in &stats {
        println!("{name} {labels:?} = {value}");
    }
    let (path, _) = expected_auto_path();
    let path = path.to_string();
    let term_l = ("listener", "term");
    let pass_l = ("listener", "pass");
    // Kernel-side counts (sock_ops).
    assert_eq!(
        sum(&stats, "tlsplice_connections_accepted", &[term_l]),
        term_total
    );
    assert_eq!(
        sum(&stats, "tlsplice_connections_closed", &[term_l]),
        term_total
    );
    assert_eq!(
        sum(&stats, "tlsplice_connections_accepted", &[pass_l]),
        pass_total
    );
    assert_eq!(
        sum(&stats, "tlsplice_connections_closed", &[pass_l]),
        pass_total
    );
    // Outcomes and data paths.
    let ok = ("outcome", "ok");
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[term_l, ("data_path", &path), ok]
        ),
        u64::from(TLS_CONNS)
    );
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[
                term_l,
                ("data_path", "none"),
                ("outcome", "handshake failed")
            ]
        ),
        NOT_TLS
    );
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[pass_l, ("data_path", "splice"), ok]
        ),
        PASS_CONNS
    );
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[pass_l, ("data_path", "none"), ("outcome", "not TLS")]
        ),
        2
    );
    // Handshakes on the client leg (passthrough runs none).
    assert_eq!(
        sum(
            &stats,
            "tlsplice_handshakes",
            &[term_l, ok, ("version", "TLSv1.3")]
        ),
        u64::from(TLS_CONNS)
    );
    assert_eq!(
        sum(
            &stats,
            "tlsplice_handshakes",
            &[term_l, ("outcome", "handshake failed")]
        ),
        NOT_TLS
    );
    assert_eq!(sum(&stats, "tlsplice_handshakes", &[pass_l]), 0);
    // Bytes, exact, per data path and direction.
    let bytes = |l, p: &str, d| {
        sum(
            &stats,
            "tlsplice_bytes",
            &[l, ("data_path", p), ("direction", d)],
        )
    };
    assert_eq!(bytes(term_l, &path, "up"), want_up);
    assert_eq!(bytes(term_l, &path, "down"), want_down);
    assert_eq!(bytes(pass_l, "splice", "up"), pass_up_bytes);
    assert_eq!(
        bytes(pass_l, "splice", "down"),
        PASS_DOWN as u64 * PASS_CONNS
    );

    // Cleartext TLS records seen in the kernel on the listener sockets (cgroup_skb).
    let records = |l, d, m| {
        sum(
            &stats,
            "tlsplice_tls_handshake_records",
            &[l, ("direction", d), ("message", m)],
        )
    };
    assert_eq!(records(term_l, "up", "ClientHello"), u64::from(TLS_CONNS));
    assert_eq!(records(term_l, "down", "ServerHello"), u64::from(TLS_CONNS));
    assert_eq!(records(pass_l, "up", "ClientHello"), PASS_CONNS);
    assert_eq!(records(pass_l, "down", "ServerHello"), 0);
    // rustls answers each non-TLS client with one fatal alert, sent in the clear.
    assert_eq!(
        sum(
            &stats,
            "tlsplice_tls_alerts",
            &[term_l, ("direction", "down"), ("level", "fatal")]
        ),
        NOT_TLS
    );
    assert_eq!(sum(&stats, "tlsplice_tls_alerts", &[pass_l]), 0);

    // The same numbers at /metrics.
    let metrics = agent.metrics();
    for line in [
        format!("tlsplice_connections_accepted_total{{listener=\"term\"}} {term_total}"),
        format!("tlsplice_connections_closed_total{{listener=\"pass\"}} {pass_total}"),
        format!(
            "tlsplice_bytes_total{{listener=\"term\",data_path=\"{path}\",direction=\"up\"}} {want_up}"
        ),
        "tlsplice_ebpf_loaded 1".to_owned(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    if tlsplice::probe::ktls_available().is_ok() {
        assert!(
            metrics.contains("tlsplice_kernel_tls_stat{stat=\"TlsTxSw\"}"),
            "{metrics}"
        );
    }

    // The table form, as an operator reads it.
    let table = Command::new(agent_binary())
        .args(["stats", "--bpf-pin-path"])
        .arg(&agent.pin)
        .output()
        .expect("tlsplice stats");
    let table = String::from_utf8_lossy(&table.stdout);
    println!("{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tlsplice_connections_accepted")
                && l.contains("listener=term")
                && l.contains(&format!(" {term_total} "))),
        "{table}"
    );

    // A clean stop removes every pin.
    let pin = agent.pin.clone();
    let status = agent.stop();
    assert!(status.success(), "{status}");
    assert!(!pin.exists(), "{} left behind", pin.display());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn without_cap_bpf_the_agent_serves_and_says_why() {
    let test = "without_cap_bpf_the_agent_serves_and_says_why";
    let Some(setpriv) = tool_or_skip(test, "setpriv") else {
        return;
    };
    let setpriv = setpriv.to_string_lossy().into_owned();
    // Root keeps only what the bounding set allows across exec.
    let wrapper = [
        setpriv.as_str(),
        "--bounding-set=-bpf,-sys_admin,-perfmon,-net_admin",
        "--",
    ];
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let (term_port, pass_port) = (free_port(), free_port());
    let term_up = sized_upstream();
    let pass_up = drain_upstream(10);
    let cfg = config(&dir, term_port, term_up, pass_port, pass_up);

    // `probe` names what is missing.
    let mut probe = Command::new(&setpriv);
    probe.args(&wrapper[1..]).arg(agent_binary()).arg("probe");
    let out = probe.output().expect("probe");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ebpf: off: ") && l.contains("CAP_BPF")),
        "{text}"
    );

    // `required` refuses to start, with the reason.
    let mut agent = AgentProcess::start(&dir, &cfg, &wrapper, &["--ebpf", "required"]);
    let status = agent.child.wait().expect("wait");
    let log = agent.log_text();
    assert!(!status.success(), "started without eBPF: {log}");
    assert!(
        log.contains("eBPF is required") && log.contains("CAP_BPF"),
        "{log}"
    );
    drop(agent);

    // Asking for the sockmap passthrough path explicitly is asking for eBPF too: without it the
    // agent refuses to start and says why, rather than relaying another way.
    let mut agent = AgentProcess::start(
        &dir,
        &cfg,
        &wrapper,
        &["--ebpf", "auto", "--passthrough-path", "sockmap"],
    );
    let status = agent.child.wait().expect("wait");
    let log = agent.log_text();
    assert!(!status.success(), "started without sockmap: {log}");
    assert!(
        log.contains("ebpf.passthrough = sockmap needs the eBPF programs")
            && log.contains("CAP_BPF"),
        "{log}"
    );
    drop(agent);

    // `auto` serves, logs why eBPF is off, and /metrics says so.
    let agent = AgentProcess::start(&dir, &cfg, &wrapper, &[]);
    let log = agent.log_text();
    println!("{log}");
    let off = log
        .lines()
        .filter(|l| {
            l.contains("eBPF off") && l.contains("Operation not permitted") && l.contains("CAP_BPF")
        })
        .count();
    assert_eq!(off, 1, "{log}");
    let term = SocketAddr::from(([127, 0, 0, 1], term_port));
    let mut tls = tls_client(term, pki.client_config());
    let up = 64u32;
    let down = 4_096u32;
    let mut msg = Vec::new();
    msg.extend_from_slice(&up.to_be_bytes());
    msg.extend_from_slice(&down.to_be_bytes());
    msg.resize(up as usize, 1);
    tls.write_all(&msg).expect("send");
    let mut got = Vec::new();
    tls.read_to_end(&mut got).expect("read");
    assert_eq!(got.len(), down as usize);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    drop(tls);
    let (path, _) = expected_auto_path();
    let want = format!(
        "tlsplice_bytes_total{{listener=\"term\",data_path=\"{path}\",direction=\"down\"}} {down}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = agent.metrics();
        if m.lines().any(|l| l == want) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        metrics.lines().any(|l| l == want),
        "{want} missing:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "tlsplice_ebpf_loaded 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("tlsplice_connections_accepted"),
        "{metrics}"
    );
    assert!(!agent.pin.exists(), "pinned without eBPF");
    let status = agent.stop();
    assert!(status.success(), "{status}");
}

/// Raises this test process's open-file limit (1,000 connections hold 2,000 sockets here).
fn raise_fd_limit() {
    tlsplice::sys::raise_open_files().expect("raise the open file limit");
}

fn passthrough_config(port: u16, upstream: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"pass\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"{upstream}\"\n"
    )
}

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_BPF: u32 = 39;
const CAP_SYS_RESOURCE: u32 = 24;

/// Starts an agent whose passthrough listener uses the sockmap path, or says why not here.
fn sockmap_agent(
    test: &str,
    dir: &Path,
    upstream: SocketAddr,
) -> Option<(AgentProcess, SocketAddr)> {
    if !bpffs_or_skip(test) {
        return None;
    }
    let port = free_port();
    let agent = AgentProcess::start(
        dir,
        &passthrough_config(port, upstream),
        &[],
        &["--ebpf", "required", "--passthrough-path", "sockmap"],
    );
    let log = agent.log_text();
    assert!(log.contains("eBPF programs loaded"), "{log}");
    // Serving sockmap connections needs only CAP_BPF (map updates) once started; the agent
    // also keeps CAP_NET_BIND_SERVICE (listeners added by a reload) and CAP_SYS_RESOURCE
    // (splice pipe sizes), and nothing else.
    agent.assert_capabilities_within(&[CAP_BPF, CAP_NET_BIND_SERVICE, CAP_SYS_RESOURCE]);
    Some((agent, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Asserts the sockmap listener "pass" counted `conns` clean connections and exactly `up` and
/// `down` bytes, with nothing passed up for lack of a peer.
fn assert_sockmap_counts(
    stats: &BTreeMap<(String, BTreeMap<String, String>), u64>,
    conns: u64,
    up: u64,
    down: u64,
) {
    let pass = ("listener", "pass");
    let sockmap = ("data_path", "sockmap");
    assert_eq!(
        sum(
            stats,
            "tlsplice_connections",
            &[pass, sockmap, ("outcome", "ok")]
        ),
        conns,
        "{stats:?}"
    );
    let bytes = |d| sum(stats, "tlsplice_bytes", &[pass, sockmap, ("direction", d)]);
    assert_eq!(bytes("up"), up, "{stats:?}");
    assert_eq!(bytes("down"), down, "{stats:?}");
    assert_eq!(sum(stats, "tlsplice_sockmap_redirect_failed_bytes", &[]), 0);
}

/// Sockets in the sock hash plus peer entries, read from the pinned maps.
fn sockmap_entries(agent: &AgentProcess) -> u64 {
    let out = Command::new(agent_binary())
        .args(["stats", "--json", "--bpf-pin-path"])
        .arg(&agent.pin)
        .output()
        .expect("tlsplice stats");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
    v["sockmap_sockets"].as_u64().expect("sockmap_sockets")
        + v["sockmap_peers"].as_u64().expect("sockmap_peers")
}

/// Waits until the sock hash and the peer map are empty, and returns how many entries are left.
fn sockmap_settles_empty(agent: &AgentProcess) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = sockmap_entries(agent);
        if n == 0 || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sockmap_relays_64_mib_each_way_byte_identical() {
    let test = "sockmap_relays_64_mib_each_way_byte_identical";
    const LEN: usize = 64 << 20;
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let hello = pki.client_hello();
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let hello_len = hello.len();
    let server = std::thread::spawn(move || {
        let (mut sock, _) = upstream.accept().expect("accept");
        let mut got = vec![0u8; hello_len];
        sock.read_exact(&mut got).expect("hello");
        let mut writer = sock.try_clone().expect("clone");
        let sender = std::thread::spawn(move || {
            send_pattern(&mut writer, 2, LEN).expect("send down");
            writer.shutdown(std::net::Shutdown::Write).expect("FIN");
        });
        expect_pattern(&mut sock, 1, LEN).expect("64 MiB up, byte-identical");
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest).expect("EOF");
        sender.join().expect("sender");
        (got, rest.len())
    });
    let Some((agent, addr)) = sockmap_agent(test, &dir, upstream_addr) else {
        return;
    };
    let start = Instant::now();
    let mut client = TcpStream::connect(addr).expect("connect");
    client.write_all(&hello).expect("hello");
    let mut writer = client.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        send_pattern(&mut writer, 1, LEN).expect("send up");
        writer.shutdown(std::net::Shutdown::Write).expect("FIN");
    });
    expect_pattern(&mut client, 2, LEN).expect("64 MiB down, byte-identical");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("EOF after the data");
    assert!(rest.is_empty(), "{} bytes after the pattern", rest.len());
    sender.join().expect("sender");
    let (got_hello, extra) = server.join().expect("upstream");
    assert_eq!(
        got_hello, hello,
        "ClientHello reached the upstream unchanged"
    );
    assert_eq!(extra, 0, "bytes after the pattern upstream");
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sockmap: 2 x 64 MiB in {secs:.2}s ({:.0} MiB/s each way)",
        64.0 / secs
    );
    drop(client);

    let pass = ("listener", "pass");
    let stats = settle(&agent, |s| sum(s, "tlsplice_connections", &[pass]) == 1);
    assert_sockmap_counts(&stats, 1, (hello.len() + LEN) as u64, LEN as u64);
    assert_eq!(
        sockmap_settles_empty(&agent),
        0,
        "entries left in the sock hash or the peer map"
    );
    let log = agent.log_text();
    assert!(log.contains("data_path=sockmap"), "{log}");
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sockmap_relays_1000_concurrent_short_connections() {
    let test = "sockmap_relays_1000_concurrent_short_connections";
    const CONNS: usize = 1_000;
    const UP: usize = 100;
    const DOWN: usize = 200;
    raise_fd_limit();
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let hello = pki.client_hello();
    let want_up = hello.len() + UP;
    // Upstream: reads the ClientHello and UP bytes, answers DOWN bytes that name the
    // connection (its first UP byte), then FIN.
    let upstream_addr = serve(move |mut sock| {
        let mut got = vec![0u8; want_up];
        if sock.read_exact(&mut got).is_ok() {
            let tag = got[want_up - UP];
            answer_and_finish(&mut sock, &[tag; DOWN]);
        }
    });
    let Some((agent, addr)) = sockmap_agent(test, &dir, upstream_addr) else {
        return;
    };
    // All 1,000 open at once, then each exchange, then each close.
    let mut clients = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut msg = hello.clone();
        msg.extend_from_slice(&[(i % 251) as u8; UP]);
        s.write_all(&msg).expect("send");
        clients.push(s);
    }
    for (i, s) in clients.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut got = [0u8; DOWN];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(
            got.iter().all(|&b| b == (i % 251) as u8),
            "connection {i} got another's bytes"
        );
    }
    for (i, s) in clients.iter_mut().enumerate() {
        s.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(rest.is_empty());
    }
    drop(clients);

    let n = CONNS as u64;
    let pass = ("listener", "pass");
    let stats = settle(&agent, |s| {
        sum(s, "tlsplice_connections", &[pass]) == n
            && sum(s, "tlsplice_connections_closed", &[pass]) == n
    });
    assert_eq!(sum(&stats, "tlsplice_connections_accepted", &[pass]), n);
    assert_eq!(sum(&stats, "tlsplice_connections_closed", &[pass]), n);
    assert_sockmap_counts(&stats, n, n * want_up as u64, n * DOWN as u64);
    assert_eq!(
        sockmap_settles_empty(&agent),
        0,
        "entries left in the sock hash or the peer map"
    );
    assert!(agent.stop().success());
}

/// Closes `sock` with a reset (SO_LINGER 0).
fn reset(sock: TcpStream) {
    socket2::SockRef::from(&sock)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(sock);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sockmap_leaves_no_entries_after_resets_and_half_closes() {
    let test = "sockmap_leaves_no_entries_after_resets_and_half_closes";
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let hello = pki.client_hello();
    let hello_len = hello.len();
    // Upstream behaviour by connection: 0 streams until reset by the client, 1 resets after
    // the hello, 2 half-closes first and then reads until the client's FIN.
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        for round in 0..3 {
            let (mut sock, _) = upstream.accept().expect("accept");
            let mut got = vec![0u8; hello_len];
            sock.read_exact(&mut got).expect("hello");
            match round {
                0 => {
                    let chunk = vec![7u8; 64 * 1024];
                    while sock.write_all(&chunk).is_ok() {}
                }
                1 => reset(sock),
                _ => {
                    sock.write_all(b"early answer").expect("answer");
                    sock.shutdown(std::net::Shutdown::Write).expect("FIN");
                    let mut rest = Vec::new();
                    sock.read_to_end(&mut rest).expect("read to FIN");
                    assert_eq!(rest, b"late request", "half-closed leg still carried data");
                }
            }
        }
    });
    let Some((agent, addr)) = sockmap_agent(test, &dir, upstream_addr) else {
        return;
    };
    // 0: the client resets while the upstream streams at it.
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(&hello).expect("hello");
    let mut buf = vec![0u8; 256 * 1024];
    c.read_exact(&mut buf).expect("streamed bytes");
    reset(c);
    // 1: the upstream resets.
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(&hello).expect("hello");
    let mut sink = Vec::new();
    let r = c.read_to_end(&mut sink);
    println!("client after the upstream reset: {r:?}");
    drop(c);
    // 2: the upstream half-closes first; the client still sends, then closes.
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(&hello).expect("hello");
    let mut early = Vec::new();
    c.read_to_end(&mut early)
        .expect("upstream's answer and FIN");
    assert_eq!(early, b"early answer");
    c.write_all(b"late request")
        .expect("send after the upstream's FIN");
    c.shutdown(std::net::Shutdown::Write).expect("FIN");
    server.join().expect("upstream");
    drop(c);

    let pass = ("listener", "pass");
    let stats = settle(&agent, |s| {
        sum(s, "tlsplice_connections", &[pass]) == 3
            && sum(s, "tlsplice_connections_closed", &[pass]) == 3
    });
    for ((name, labels), value) in &stats {
        println!("{name} {labels:?} = {value}");
    }
    assert_eq!(sum(&stats, "tlsplice_connections_closed", &[pass]), 3);
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[pass, ("data_path", "sockmap")]
        ),
        3,
        "{stats:?}"
    );
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[pass, ("data_path", "sockmap"), ("outcome", "ok")]
        ),
        1,
        "only the half-closed connection ends cleanly: {stats:?}"
    );
    assert_eq!(
        sockmap_settles_empty(&agent),
        0,
        "entries left in the sock hash or the peer map"
    );
    let log = agent.log_text();
    println!("{log}");
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_second_agent_on_the_same_pins_runs_without_ebpf_and_says_why() {
    let test = "a_second_agent_on_the_same_pins_runs_without_ebpf_and_says_why";
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream = drain_upstream(10);
    let first = AgentProcess::start(&dir, &passthrough_config(free_port(), upstream), &[], &[]);
    assert!(
        first.log_text().contains("eBPF programs loaded"),
        "{}",
        first.log_text()
    );
    let second = AgentProcess::start_pinned(
        &dir,
        &passthrough_config(free_port(), upstream),
        &[],
        &[],
        Some(&first.pin),
    );
    let log = second.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("eBPF off")
                && l.contains("in use by another running tlsplice agent")),
        "{log}"
    );
    // The first agent's pins are untouched and still readable.
    let stats = first.stats();
    println!("{stats:?}");
    assert!(second.stop().success());
    assert!(
        first.pin.join("TLSPLICE_STATS").exists(),
        "the second agent removed the first's pins"
    );
    let pin = first.pin.clone();
    assert!(first.stop().success());
    assert!(!pin.exists());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn passthrough_auto_measures_both_paths_and_says_which() {
    let test = "passthrough_auto_measures_both_paths_and_says_which";
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    const DOWN: usize = 5_000;
    let hello = pki.client_hello();
    let upstream = hello_upstream(hello.len(), DOWN);
    let port = free_port();
    let agent = AgentProcess::start(
        &dir,
        &passthrough_config(port, upstream),
        &[],
        &["--ebpf", "required", "--passthrough-path", "auto"],
    );
    let log = agent.log_text();
    let measured = log
        .lines()
        .find(|l| {
            l.contains("passthrough data path")
                && l.contains("ebpf.passthrough = auto: measured splice")
        })
        .unwrap_or_else(|| panic!("no measurement logged:\n{log}"));
    println!("{measured}");
    let chosen = if measured.contains("sockmap=true") {
        "sockmap"
    } else {
        "splice"
    };
    // A connection takes the measured path and says why.
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
    s.write_all(&hello).expect("hello");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("answer and FIN");
    assert_eq!(got.len(), DOWN);
    s.shutdown(std::net::Shutdown::Write).expect("FIN");
    drop(s);
    let pass = ("listener", "pass");
    let stats = settle(&agent, |st| sum(st, "tlsplice_connections", &[pass]) == 1);
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[pass, ("data_path", chosen), ("outcome", "ok")]
        ),
        1,
        "{stats:?}"
    );
    let bytes = |d| {
        sum(
            &stats,
            "tlsplice_bytes",
            &[pass, ("data_path", chosen), ("direction", d)],
        )
    };
    assert_eq!(bytes("up"), hello.len() as u64);
    assert_eq!(bytes("down"), DOWN as u64);
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&format!("data_path={chosen}"))
            && l.contains("ebpf.passthrough = auto: measured")),
        "{log}"
    );
    // The measurement's own connections are not counted as the listener's.
    assert_eq!(sum(&stats, "tlsplice_connections_accepted", &[pass]), 1);
    assert_eq!(sockmap_settles_empty(&agent), 0);
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sockmap_takes_splice_for_a_client_that_half_closed_first_and_says_why() {
    let test = "sockmap_takes_splice_for_a_client_that_half_closed_first_and_says_why";
    let pki = TestPki::generate();
    let dir = pki.write_files();
    const DOWN: usize = 3_000;
    let upstream = drain_upstream(DOWN);
    let Some((agent, addr)) = sockmap_agent(test, &dir, upstream) else {
        return;
    };
    // A ClientHello and the FIN right behind it: the client socket is no longer established
    // when the agent would put it into the sock hash, which the kernel refuses.
    let hello = pki.client_hello();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&hello).expect("hello");
        s.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("answer");
        assert_eq!(got.len(), DOWN);
    }
    let pass = ("listener", "pass");
    let stats = settle(&agent, |st| sum(st, "tlsplice_connections", &[pass]) == 5);
    // Each connection went over splice or, if the agent was quicker than the FIN, sockmap;
    // all of them cleanly and with every byte counted.
    let ok = |p| {
        sum(
            &stats,
            "tlsplice_connections",
            &[pass, ("data_path", p), ("outcome", "ok")],
        )
    };
    assert_eq!(ok("splice") + ok("sockmap"), 5, "{stats:?}");
    let down = sum(&stats, "tlsplice_bytes", &[pass, ("direction", "down")]);
    assert_eq!(down, 5 * DOWN as u64);
    let log = agent.log_text();
    let refused = log
        .lines()
        .filter(|l| {
            l.contains("data_path=splice")
                && l.contains(
                    "sockmap refused this connection: the client leg has already received a FIN",
                )
        })
        .count();
    assert_eq!(refused as u64, ok("splice"), "{log}");
    assert_eq!(sockmap_settles_empty(&agent), 0);
    assert!(agent.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sockmap_connections_idle_out_though_the_agent_moves_no_byte() {
    let test = "sockmap_connections_idle_out_though_the_agent_moves_no_byte";
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream = serve(|sock| {
        let _ = std::io::copy(&mut &sock, &mut &sock);
    });
    let port = free_port();
    let agent = AgentProcess::start(
        &dir,
        &format!(
            "{}idle_timeout_ms = 500\n",
            passthrough_config(port, upstream)
        ),
        &[],
        &["--ebpf", "required", "--passthrough-path", "sockmap"],
    );
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let hello = pki.client_hello();
    s.write_all(&hello).expect("hello");
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).expect("hello echoed");
    // Busy for 1.5 s: the kernel redirects every byte, and the connection stays open.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"tick").expect("open while busy");
        let mut tick = [0u8; 4];
        s.read_exact(&mut tick).expect("tick echoed");
    }
    let quiet = Instant::now();
    let mut buf = [0u8; 16];
    let closed = s.read(&mut buf);
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let quiet = quiet.elapsed();
    assert!(
        quiet >= Duration::from_millis(400) && quiet < Duration::from_secs(5),
        "{quiet:?}"
    );
    let stats = settle(&agent, |st| sum(st, "tlsplice_connections", &[]) == 1);
    assert_eq!(
        sum(
            &stats,
            "tlsplice_connections",
            &[("data_path", "sockmap"), ("outcome", "idle timeout")]
        ),
        1,
        "{stats:?}"
    );
    // The redirected bytes are counted: the ClientHello and 4-byte ticks, each way.
    let up = sum(&stats, "tlsplice_bytes", &[("direction", "up")]);
    assert!(
        up > hello.len() as u64 && (up - hello.len() as u64).is_multiple_of(4),
        "{up}"
    );
    assert_eq!(sockmap_settles_empty(&agent), 0);
}

/// Idle sockmap connections wait parked, with no task of their own (the gauge counts them);
/// on SIGTERM they are closed at the drain deadline like any other connection, each reported
/// once under its reason, and the agent exits.
#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn parked_sockmap_connections_end_at_the_drain_deadline() {
    let test = "parked_sockmap_connections_end_at_the_drain_deadline";
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let upstream = serve(|sock| {
        let _ = std::io::copy(&mut &sock, &mut &sock);
    });
    let port = free_port();
    let mut agent = AgentProcess::start(
        &dir,
        &format!(
            "[limits]\ndrain_timeout_ms = 1500\n{}",
            passthrough_config(port, upstream)
        ),
        &[],
        &["--ebpf", "required", "--passthrough-path", "sockmap"],
    );
    let hello = pki.client_hello();
    let mut clients: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s =
                TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s.write_all(&hello).expect("hello");
            let mut back = vec![0u8; hello.len()];
            s.read_exact(&mut back).expect("hello echoed");
            s
        })
        .collect();
    let parked = |agent: &AgentProcess| {
        tlsplice_tests::metric(&agent.metrics(), "tlsplice_parked_connections", &[])
    };
    tlsplice_tests::eventually(Duration::from_secs(10), "3 connections parked", || {
        parked(&agent) == 3.0
    });
    // Parked, they still carry bytes: the kernel moves them.
    for c in &mut clients {
        c.write_all(b"tick").expect("write while parked");
        let mut tick = [0u8; 4];
        c.read_exact(&mut tick).expect("tick echoed while parked");
    }
    assert_eq!(parked(&agent), 3.0, "{}", agent.metrics());
    let signalled = Instant::now();
    agent.signal(libc::SIGTERM);
    for mut c in clients {
        let mut buf = [0u8; 16];
        let closed = c.read(&mut buf);
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    let status = agent.terminate().expect("the agent exits after the drain");
    assert!(status.success(), "{status}");
    let log = agent.log_text();
    assert_eq!(log.matches("outcome=drain deadline ").count(), 3, "{log}");
    assert_eq!(log.matches("data_path=sockmap").count(), 3, "{log}");
}

/// Whether `dir` is the mount point of a bpf filesystem.
fn bpffs_mounted_at(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let dir = dir.to_string_lossy();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&dir.as_ref()) && f.get(2) == Some(&"bpf")
    })
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn the_agent_mounts_a_bpf_filesystem_for_its_pins_when_none_is_there() {
    let test = "the_agent_mounts_a_bpf_filesystem_for_its_pins_when_none_is_there";
    // Mounting needs what loading needs (root, here); the guests always have it.
    if !bpffs_or_skip(test) {
        return;
    }
    let pki = TestPki::generate();
    let dir = pki.write_files();
    let base = std::env::temp_dir().join(format!("tlsplice-bpffs-{}", std::process::id()));
    let mount_point = base.join("bpf");
    std::fs::create_dir_all(&mount_point).expect("an empty directory");
    let pin = mount_point.join("tlsplice");
    let cfg = config(
        &dir,
        free_port(),
        sized_upstream(),
        free_port(),
        drain_upstream(10),
    );
    let agent = AgentProcess::start_pinned(&dir, &cfg, &[], &["--ebpf", "required"], Some(&pin));
    let log = agent.log_text();
    let mounted = bpffs_mounted_at(&mount_point);
    let loaded = agent.metrics().contains("tlsplice_ebpf_loaded 1");
    let status = agent.stop();
    // Unmounted before any assertion, so a failure leaves no mount behind.
    let unmount = {
        use std::os::unix::ffi::OsStrExt as _;
        let path = std::ffi::CString::new(mount_point.as_os_str().as_bytes()).expect("path");
        // SAFETY: umount2 reads one NUL-terminated path, which outlives the call.
        unsafe { libc::umount2(path.as_ptr(), 0) }
    };
    assert!(
        mounted,
        "no bpf filesystem at {}: {log}",
        mount_point.display()
    );
    assert!(
        loaded && log.contains("mounted a bpf filesystem for the pins"),
        "{log}"
    );
    assert!(status.success(), "{status}");
    assert_eq!(
        unmount,
        0,
        "umount {}: {}",
        mount_point.display(),
        std::io::Error::last_os_error()
    );

    // A directory with something in it is never mounted over: eBPF required cannot start.
    std::fs::write(mount_point.join("keep"), b"x").expect("a file");
    let mut agent =
        AgentProcess::start_pinned(&dir, &cfg, &[], &["--ebpf", "required"], Some(&pin));
    let status = agent.child.wait().expect("wait");
    let log = agent.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("is not empty, so the agent does not mount over it"),
        "{log}"
    );
    assert!(!bpffs_mounted_at(&mount_point), "mounted over a file");
    drop(agent);
    let _ = std::fs::remove_dir_all(&base);
}
