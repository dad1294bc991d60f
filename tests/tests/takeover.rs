//! Live upgrade: a new agent takes the listening sockets over from the running one through its
//! takeover socket. No connection attempt is refused while it happens, an established
//! connection finishes in the old agent (which then exits), and a takeover the new agent
//! cannot complete leaves the old one serving everything.
//!
//! These run the agent binary, on the host and in every guest (where the terminate listener
//! takes the kTLS data path).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tlsplice_tests::ops::{
    connect, echo, echo_upstream, finish, terminate_listener, test_dir, trusting,
};
use tlsplice_tests::{AgentProcess, TestPki, eventually};

fn agent_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One new TLS connection through the agent that echoes and closes cleanly.
fn one_exchange(addr: SocketAddr, trust: &Arc<ClientConfig>) -> Result<(), String> {
    let mut c = connect(addr, trust.clone(), "localhost")?;
    echo(&mut c, b"through whichever agent accepts").map_err(|e| format!("echo: {e}"))?;
    finish(c);
    Ok(())
}

/// New connections, one after another, until told to stop (at most `limit`): how many
/// worked, and every failure.
fn keep_connecting(
    addr: SocketAddr,
    trust: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let (mut worked, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
            match one_exchange(addr, &trust) {
                Ok(()) => worked += 1,
                Err(e) => failed.push(format!("after {:?}: {e}", started.elapsed())),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (worked, failed)
    })
}

fn takeover_args(socket: &Path) -> Vec<String> {
    vec![
        "--ebpf".into(),
        "off".into(),
        "--takeover-socket".into(),
        socket.display().to_string(),
    ]
}

/// An agent serving a terminate listener, offering takeovers.
struct Running {
    dir: std::path::PathBuf,
    files: std::path::PathBuf,
    port: u16,
    config: String,
    socket: std::path::PathBuf,
    trust: Arc<ClientConfig>,
    old: AgentProcess,
}

/// `also`: a second listener ("dropped") on this port.
fn running_agent(name: &str, drain_ms: u64, also: Option<u16>) -> Running {
    let dir = test_dir(name);
    let pki = TestPki::generate();
    let files = pki.write_files();
    let port = tlsplice_tests::free_port();
    let mut config = format!(
        "[limits]\ndrain_timeout_ms = {drain_ms}\n{}",
        terminate_listener("web", port, echo_upstream(), &files)
    );
    if let Some(also) = also {
        config.push_str(&terminate_listener(
            "dropped",
            also,
            echo_upstream(),
            &files,
        ));
    }
    let socket = dir.join("takeover.sock");
    let args = takeover_args(&socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut old = AgentProcess::start(&dir, &config, &[], &args);
    assert!(old.child_running(), "{}", old.log_text());
    Running {
        dir,
        files,
        port,
        config,
        socket,
        trust: trusting(&[&pki]),
        old,
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_new_agent_takes_the_listeners_over_without_refusing_a_connection() {
    let Running {
        dir,
        port,
        config,
        socket,
        trust,
        mut old,
        ..
    } = running_agent("takeover", 20_000, None);
    let args = takeover_args(&socket);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut established = connect(agent_addr(port), trust.clone(), "localhost").expect("connect");
    echo(&mut established, b"before the upgrade").expect("echo");

    let stop = Arc::new(AtomicBool::new(false));
    let connecting = keep_connecting(
        agent_addr(port),
        trust.clone(),
        stop.clone(),
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut new_args = args.clone();
    let from = socket.display().to_string();
    new_args.extend(["--takeover", from.as_str()]);
    let started = Instant::now();
    let mut new = AgentProcess::start_with_admin(&dir, &config, old.admin, &new_args);
    assert!(
        new.child_running(),
        "the new agent did not start:\n{}",
        new.log_text()
    );
    eventually(
        Duration::from_secs(30),
        "the old agent to hand over",
        || old.log_text().contains("taken over:"),
    );
    println!(
        "takeover done {:?} after the new agent started",
        started.elapsed()
    );
    let new_log = new.log_text();
    assert!(
        new_log.contains("listening socket taken over from the running agent"),
        "{new_log}"
    );
    // Both admin servers shared one socket; the old one's is closed now.
    eventually(
        Duration::from_secs(10),
        "/readyz from the new agent",
        || new.get("/readyz").0 == 200,
    );
    // Until the old admin server has stopped, a request may still reach it.
    eventually(
        Duration::from_secs(10),
        "the new agent's takeover metrics",
        || {
            let metrics = new.metrics();
            tlsplice_tests::metric(&metrics, "tlsplice_takeover_sockets", &["how=\"adopted\""])
                == 2.0
                && metrics.contains("tlsplice_takeover_seconds ")
        },
    );

    // The established connection goes on in the old agent, and ends when it closes.
    for _ in 0..5 {
        echo(&mut established, b"during the old agent's drain").expect("echo while draining");
        std::thread::sleep(Duration::from_millis(100));
    }
    // New connections keep working a while after the hand-over, all through the new agent.
    std::thread::sleep(Duration::from_secs(1));
    finish(established);
    let status = old
        .exited_within(Duration::from_secs(15))
        .expect("the old agent exits on its own once it holds nothing");
    assert!(status.success(), "{status}\n{}", old.log_text());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (worked, failed) = connecting.join().expect("connecting thread");
    println!(
        "{worked} connections during the upgrade, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "refused or broken during the upgrade: {failed:#?}"
    );
    assert!(worked >= 10, "only {worked} connections during the upgrade");
    let old_log = old.log_text();
    assert!(old_log.contains("stopped"), "{old_log}");
    // The new agent serves alone now, and can be taken over in turn.
    one_exchange(agent_addr(port), &trust).expect("through the new agent");
    eventually(
        Duration::from_secs(10),
        "the new agent's takeover socket in place",
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
    );
    assert!(new.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_takeover_the_new_agent_cannot_complete_leaves_the_old_one_serving() {
    let Running {
        dir,
        files,
        port,
        config,
        socket,
        trust,
        mut old,
    } = running_agent("takeover-refused", 2_000, None);
    let from = socket.display().to_string();

    // Another record version: refused before any socket moves.
    let mut other_version = AgentProcess::start_with_admin(
        &dir,
        &config,
        old.admin,
        &[
            "--ebpf",
            "off",
            "--takeover",
            &from,
            "--takeover-record-version",
            "99",
        ],
    );
    let status = other_version.terminate().expect("the new agent exits");
    assert!(!status.success(), "{}", other_version.log_text());
    assert!(
        other_version.log_text().contains("record version 99"),
        "{}",
        other_version.log_text()
    );

    // Sockets received, then a second listener whose address another socket holds: the new
    // agent fails to start, never says it serves, and drops what it was given.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let held = taken.local_addr().expect("address").port();
    let broken = format!(
        "{config}{}",
        terminate_listener("other", held, echo_upstream(), &files)
    );
    let mut bad_config = AgentProcess::start_with_admin(
        &dir,
        &broken,
        old.admin,
        &["--ebpf", "off", "--takeover", &from],
    );
    let status = bad_config.terminate().expect("the new agent exits");
    assert!(!status.success(), "{}", bad_config.log_text());

    eventually(
        Duration::from_secs(10),
        "both refusals in the old agent's log",
        || old.log_text().matches("takeover refused").count() >= 2,
    );
    assert!(old.child_running(), "{}", old.log_text());
    one_exchange(agent_addr(port), &trust).expect("the old agent still serves");
    assert_eq!(
        old.get("/readyz").0,
        200,
        "the old agent's admin server still answers"
    );
    let metrics = old.metrics();
    assert!(
        tlsplice_tests::metric(&metrics, "tlsplice_takeovers_refused_total", &[]) >= 2.0,
        "{metrics}"
    );
    assert!(
        !old.log_text().contains("taken over:"),
        "{}",
        old.log_text()
    );
    assert!(old.stop().success());
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn a_listener_the_new_configuration_drops_refuses_connections_after_the_upgrade() {
    let dropped = tlsplice_tests::free_port();
    let Running {
        dir,
        files,
        port,
        socket,
        trust,
        mut old,
        ..
    } = running_agent("takeover-dropped", 2_000, Some(dropped));
    one_exchange(agent_addr(dropped), &trust).expect("the listener to drop serves before");
    let from = socket.display().to_string();
    let kept = format!(
        "[limits]\ndrain_timeout_ms = 2000\n{}",
        terminate_listener("web", port, echo_upstream(), &files)
    );
    let new = AgentProcess::start_with_admin(
        &dir,
        &kept,
        old.admin,
        &["--ebpf", "off", "--takeover", &from],
    );
    old.exited_within(Duration::from_secs(15))
        .expect("the old agent exits once it holds nothing");
    one_exchange(agent_addr(port), &trust).expect("the kept listener, through the new agent");
    let err = std::net::TcpStream::connect(agent_addr(dropped))
        .expect_err("the dropped listener's socket still listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        new.log_text()
            .contains("a socket this configuration does not serve is closed"),
        "{}",
        new.log_text()
    );
    assert!(new.stop().success());
}
