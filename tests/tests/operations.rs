//! Operating the agent: configuration errors with their location, flags and environment over
//! the file, the admin endpoints, certificates chosen by SNI and reloaded while connections
//! stream, a certificate that does not load, limits, and the drain on SIGTERM.
//!
//! These tests run the agent binary, as an operator would, on the host and in every guest
//! (where the terminate listeners take the kTLS data path).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore, StreamOwned};
use tlsplice_tests::ops::{
    Client, connect, echo, echo_upstream, finish, terminate_listener, test_dir, trusting,
};
use tlsplice_tests::{AgentProcess, TestPki, agent_binary, eventually, free_port, metric, serve};

/// The leaf certificate a new session gets, the session closed cleanly; `None` when the
/// handshake fails.
fn served_leaf(addr: SocketAddr, config: Arc<ClientConfig>) -> Option<CertificateDer<'static>> {
    let c = connect(addr, config, "localhost").ok()?;
    let cert = leaf(&c);
    finish(c);
    Some(cert)
}

/// The leaf certificate the agent presented.
fn leaf(c: &Client) -> CertificateDer<'static> {
    c.conn.peer_certificates().expect("server certificate")[0].clone()
}

fn pin_args() -> [&'static str; 2] {
    // These tests are about operations, not eBPF: keep them independent of bpffs.
    ["--ebpf", "off"]
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn check_and_run_report_every_problem_with_its_location() {
    let dir = test_dir("check");
    let pki_dir = TestPki::generate().write_files();
    let other = TestPki::generate().write_files();
    let text = format!(
        "[limits]\nmax_handshakes = 0\n\
         [[listener]]\nname = \"web\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:1\"\n\
         upstream = \"127.0.0.1:2\"\nhandshake_timeout_ms = 0\ncert = \"{cert}\"\n\
         [[listener]]\nname = \"api\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:3\"\n\
         upstream = \"127.0.0.1:4\"\ncert = \"{cert}\"\nkey = \"{wrong_key}\"\n\
         [[listener]]\nname = \"files\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:5\"\n\
         upstream = \"127.0.0.1:6\"\ncert = \"{missing}\"\nkey = \"{key}\"\n",
        cert = pki_dir.join("server.pem").display(),
        key = pki_dir.join("server.key").display(),
        wrong_key = other.join("server.key").display(),
        missing = dir.join("absent.pem").display(),
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, &text).expect("config");
    let p = path.display().to_string();

    // Values first: every one reported, each with file, listener and key.
    let out = Command::new(agent_binary())
        .args(["check", "--config", &p])
        .output()
        .expect("tlsplice check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for line in [
        format!("{p}: limits.max_handshakes: must be above 0"),
        format!("{p}: listener \"web\": handshake_timeout_ms: must be above 0"),
        format!("{p}: listener \"web\": key: mode terminate needs the certificate's private key"),
        format!("{p}: invalid: 3 problem(s)"),
    ] {
        assert!(stderr.lines().any(|l| l == line), "missing {line:?}");
    }

    // Once the values are right, the files: every listener's material is loaded and checked.
    let fixed = text
        .replace("max_handshakes = 0", "max_handshakes = 10")
        .replace("handshake_timeout_ms = 0\n", "handshake_timeout_ms = 10\n")
        .replace(
            "listen = \"127.0.0.1:1\"\n",
            &format!(
                "listen = \"127.0.0.1:1\"\nkey = \"{}\"\n",
                pki_dir.join("server.key").display()
            ),
        );
    std::fs::write(&path, &fixed).expect("config");
    let out = Command::new(agent_binary())
        .args(["check", "--config", &p])
        .output()
        .expect("tlsplice check");
    let check_err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("{check_err}");
    assert_eq!(out.status.code(), Some(1), "{check_err}");
    let api = check_err
        .lines()
        .find(|l| l.starts_with(&format!("{p}: listener \"api\": key ")))
        .unwrap_or_else(|| panic!("no line for the mismatched key:\n{check_err}"));
    assert!(api.contains("does not fit"), "{api}");
    assert!(
        check_err.lines().any(
            |l| l.starts_with(&format!("{p}: listener \"files\": certificate "))
                && l.contains("absent.pem")
        ),
        "{check_err}"
    );
    assert!(check_err.contains("invalid: 2 problem(s)"), "{check_err}");

    // The agent refuses to start with the same lines, before binding anything.
    let out = Command::new(agent_binary())
        .args(["run", "--ebpf", "off", "--config", &p])
        .output()
        .expect("tlsplice run");
    let run_err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{run_err}");
    for line in check_err.lines() {
        assert!(
            run_err.contains(line),
            "run does not say {line:?}:\n{run_err}"
        );
    }

    // A valid configuration passes.
    let good = terminate_listener("web", 1, "127.0.0.1:2".parse().expect("addr"), &pki_dir);
    std::fs::write(&path, good).expect("config");
    let out = Command::new(agent_binary())
        .args(["check", "--config", &p])
        .output()
        .expect("tlsplice check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 listener(s), valid"));
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn flags_and_environment_override_the_file_and_admin_endpoints_answer() {
    let dir = test_dir("flags");
    let pki = TestPki::generate();
    let pki_dir = pki.write_files();
    let port = free_port();
    let config = format!(
        "[limits]\nmax_connections = 5\nmax_handshakes = 6\ndrain_timeout_ms = 7000\n\
         [admin]\nlisten = \"127.0.0.1:1\"\n{}",
        terminate_listener("web", port, echo_upstream(), &pki_dir)
    );
    // The admin address comes from --admin-addr (AgentProcess), which beats the file's;
    // TLSPLICE_MAX_HANDSHAKES beats the file; --max-handshakes would beat both, so
    // TLSPLICE_DRAIN_TIMEOUT_MS (env) loses to --drain-timeout-ms (flag).
    let agent = AgentProcess::start_with_env(
        &dir,
        &config,
        &[
            ("TLSPLICE_MAX_HANDSHAKES", "8"),
            ("TLSPLICE_DRAIN_TIMEOUT_MS", "9000"),
            ("TLSPLICE_LOG_FORMAT", "json"),
        ],
        &["--ebpf", "off", "--drain-timeout-ms", "1500"],
    );
    let (status, body) = agent.get("/readyz");
    assert_eq!(status, 200, "{body}");
    // Without eBPF, only CAP_NET_BIND_SERVICE (bit 10) and CAP_SYS_RESOURCE (24) are left,
    // on every thread.
    agent.assert_capabilities_within(&[10, 24]);
    assert!(
        body.starts_with("ready: 1 listener(s) bound; eBPF off"),
        "{body}"
    );
    let (status, body) = agent.get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let (status, body) = agent.get("/config");
    assert_eq!(status, 200, "{body}");
    let effective: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
    assert_eq!(effective["limits"]["max_connections"], 5, "file");
    assert_eq!(
        effective["limits"]["max_handshakes"], 8,
        "environment over file"
    );
    assert_eq!(
        effective["limits"]["drain_timeout_ms"], 1500,
        "flag over environment"
    );
    assert_eq!(
        effective["admin"]["listen"],
        agent.admin.to_string(),
        "flag over file"
    );
    assert_eq!(effective["ebpf"]["mode"], "off");
    assert_eq!(effective["listener"][0]["name"], "web");

    // A session through it, then: no key material in /config or in the logs.
    let mut c = connect(agent_addr(port), trusting(&[&pki]), "localhost").expect("handshake");
    echo(&mut c, b"hello").expect("echo");
    finish(c);
    eventually(Duration::from_secs(10), "the connection's log line", || {
        agent.log_text().contains("connection closed")
    });
    let key_body: String = pki
        .server_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let log = agent.log_text();
    for (what, text) in [("/config", body.as_str()), ("the log", log.as_str())] {
        assert!(
            !text.contains("PRIVATE KEY"),
            "{what} holds a PEM key block"
        );
        for chunk in key_body.as_bytes().chunks(24) {
            let chunk = std::str::from_utf8(chunk).expect("base64");
            assert!(!text.contains(chunk), "{what} holds part of the key");
        }
    }
    // --log-format json (here from TLSPLICE_LOG_FORMAT): every line is one JSON object.
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(
        log.lines()
            .any(|l| l.contains("\"message\":\"connection closed\"")
                && l.contains("\"listener\":\"web\"")),
        "{log}"
    );
}

fn agent_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn certificates_are_chosen_by_sni_and_their_expiry_is_exported() {
    let dir = test_dir("sni");
    let default = TestPki::generate_for(&["localhost", "other.test", "a.b.apps.test"]);
    let exact = TestPki::generate_for(&["api.test"]);
    let wild = TestPki::generate_for(&["*.apps.test"]);
    let (d, e, w) = (
        default.write_files(),
        exact.write_files(),
        wild.write_files(),
    );
    let port = free_port();
    let config = format!(
        "{}[[listener.certs]]\ncert = \"{}\"\nkey = \"{}\"\nserver_names = [\"API.test\"]\n\
         [[listener.certs]]\ncert = \"{}\"\nkey = \"{}\"\n",
        terminate_listener("web", port, echo_upstream(), &d),
        e.join("server.pem").display(),
        e.join("server.key").display(),
        w.join("server.pem").display(),
        w.join("server.key").display(),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let all = trusting(&[&default, &exact, &wild]);
    for (sni, want) in [
        ("api.test", &exact),
        ("one.apps.test", &wild),
        ("localhost", &default),
        ("other.test", &default),
    ] {
        let mut c = connect(agent_addr(port), all.clone(), sni).expect("handshake");
        assert_eq!(leaf(&c), want.server_cert, "certificate for {sni}");
        echo(&mut c, sni.as_bytes()).expect("echo");
        finish(c);
    }
    // A second label under the wildcard is not covered by it.
    let c = connect(agent_addr(port), all, "a.b.apps.test").expect("handshake");
    assert_eq!(leaf(&c), default.server_cert);
    finish(c);

    let metrics = agent.metrics();
    let mut files = 0;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("tlsplice_certificate_expiry_seconds{"))
    {
        files += 1;
        let left: f64 = line
            .rsplit(' ')
            .next()
            .expect("value")
            .parse()
            .expect("number");
        // rcgen's certificates are valid until 4096-01-01: about 2,070 years from now.
        let years = left / (365.25 * 86_400.0);
        assert!((2_000.0..2_100.0).contains(&years), "{line}");
        assert!(line.contains("listener=\"web\""), "{line}");
    }
    assert_eq!(files, 3, "{metrics}");
    assert_eq!(
        metric(&metrics, "tlsplice_certificate_reload_failing", &["web"]),
        0.0
    );
}

/// A Kubernetes Secret volume: the files are links through `..data`, a link to a timestamped
/// directory that the kubelet swaps atomically.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, pki: &TestPki) -> Self {
        std::fs::create_dir_all(dir).expect("volume");
        let mut v = Self {
            dir: dir.to_owned(),
            generation: 0,
        };
        v.publish(&pki.server_cert_pem, &pki.server_key_pem);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).expect("link");
        }
        v
    }

    /// Writes a new generation and swaps `..data` to it with one rename, as the kubelet does.
    fn publish(&mut self, cert: &str, key: &str) {
        self.generation += 1;
        let name = format!("..2026_11_26_{}", self.generation);
        let generation = self.dir.join(&name);
        std::fs::create_dir_all(&generation).expect("generation");
        std::fs::write(generation.join("tls.crt"), cert).expect("cert");
        std::fs::write(generation.join("tls.key"), key).expect("key");
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).expect("link");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
    }

    fn listener(&self, name: &str, port: u16, upstream: SocketAddr) -> String {
        format!(
            "[[listener]]\nname = \"{name}\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:{port}\"\n\
             upstream = \"{upstream}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.dir.join("tls.crt").display(),
            self.dir.join("tls.key").display()
        )
    }
}

impl SecretVolume {
    /// Replaces the current generation's files in place, each by a rename (as a tool that
    /// writes a temporary file and moves it over the old one does): the key first, then the
    /// certificate.
    fn replace_files(&self, cert: &str, key: &str) {
        let generation = self.dir.join(format!("..2026_11_26_{}", self.generation));
        for (name, text) in [("tls.key", key), ("tls.crt", cert)] {
            let tmp = generation.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("temporary file");
            std::fs::rename(&tmp, generation.join(name)).expect("rename over");
        }
    }
}

/// A number from the environment (the soak runs this test longer and harder), or `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn certificates_rotated_under_a_handshake_load_fail_no_handshake() {
    let test = "certificates_rotated_under_a_handshake_load_fail_no_handshake";
    if tlsplice_tests::in_guest() {
        // An emulated guest runs a few handshakes a second; the load is the point here, and
        // nothing in the reload depends on the kernel.
        tlsplice_tests::skip(test, "host only: a TCG guest cannot hold a handshake load");
        return;
    }
    // `cargo xtask soak` runs 20 rotations at 200 handshakes a second with a release agent.
    let rotations = env_or("TLSPLICE_ROTATIONS", 6) as usize;
    let rate = env_or("TLSPLICE_ROTATION_HANDSHAKES_PER_SECOND", 40);
    let interval = Duration::from_millis(200);
    let dir = test_dir("rotation");
    let pkis: Vec<TestPki> = (0..=rotations + 1).map(|_| TestPki::generate()).collect();
    let mut volume = SecretVolume::new(&dir.join("certs"), &pkis[0]);
    let port = free_port();
    let config = format!(
        "[certs]\nreload_interval_ms = {}\n{}",
        interval.as_millis(),
        volume.listener("web", port, echo_upstream())
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let addr = agent_addr(port);
    let all: Vec<&TestPki> = pkis.iter().collect();
    let trust = trusting(&all);

    // Clients at `rate` handshakes a second in all, each handshake timed and its leaf kept.
    const CLIENTS: u64 = 8;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, trust) = (stop.clone(), trust.clone());
            let pause = Duration::from_micros(1_000_000 * CLIENTS / rate.max(1));
            std::thread::spawn(move || {
                let mut seen: Vec<(Duration, Duration, Result<CertificateDer<'static>, String>)> =
                    Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let start = epoch.elapsed();
                    let served = connect(addr, trust.clone(), "localhost").map(|mut c| {
                        let cert = leaf(&c);
                        let _ = echo(&mut c, b"r");
                        finish(c);
                        cert
                    });
                    seen.push((start, epoch.elapsed(), served));
                    next += pause;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // Rotations a second and a half apart, by a directory swap and by files renamed over,
    // in turn.
    let mut published = Vec::new();
    for (i, pki) in pkis.iter().enumerate().skip(1).take(rotations) {
        if i % 2 == 1 {
            volume.publish(&pki.server_cert_pem, &pki.server_key_pem);
        } else {
            volume.replace_files(&pki.server_cert_pem, &pki.server_key_pem);
        }
        published.push(epoch.elapsed());
        std::thread::sleep(Duration::from_millis(1_500));
    }
    // A broken rotation (a certificate that does not fit its key) keeps the last one serving.
    let last = &pkis[rotations];
    volume.publish(&pkis[rotations + 1].server_cert_pem, &last.server_key_pem);
    until_reload_fails(&agent, "web");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut seen: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    seen.sort_by_key(|(start, _, _)| *start);

    // No handshake failed; each served the certificate of the newest rotation published
    // before it began, or the one before while the reload was still under way.
    let failed: Vec<_> = seen.iter().filter(|(_, _, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    let leaf_index = |cert: &CertificateDer<'static>| {
        pkis.iter()
            .position(|p| p.server_cert == *cert)
            .expect("a certificate of the test")
    };
    let mut lag = Duration::ZERO;
    for (start, _, served) in &seen {
        let served = leaf_index(served.as_ref().expect("checked"));
        let newest = published.iter().filter(|p| **p <= *start).count();
        assert!(
            served == newest || served + 1 == newest,
            "a handshake at {start:?} got rotation {served}, the newest was {newest}"
        );
        if served + 1 == newest {
            lag = lag.max(*start - published[newest - 1]);
        }
    }
    // Reloads are read every interval; a half-replaced pair is read again after 300 ms.
    assert!(
        lag <= interval + Duration::from_millis(300) + Duration::from_millis(500),
        "an old certificate was served {lag:?} after its rotation"
    );
    let span = seen.last().map_or(Duration::ZERO, |s| s.0) - seen[0].0;
    let achieved = seen.len() as f64 / span.as_secs_f64().max(0.001);
    println!(
        "{rotations} rotations under {} handshakes ({achieved:.0}/s, asked {rate}/s): 0 failed; \
         the old certificate served at most {lag:?} after a rotation",
        seen.len()
    );
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "tlsplice_certificate_reloads_total",
            &["outcome=\"loaded\""]
        ),
        rotations as f64,
        "{m}"
    );
}

/// Waits until `listener`'s certificate reload shows as failing.
fn until_reload_fails(agent: &AgentProcess, listener: &str) {
    let label = format!("listener=\"{listener}\"");
    eventually(
        Duration::from_secs(20),
        "the reload failure to show",
        || {
            metric(
                &agent.metrics(),
                "tlsplice_certificate_reload_failing",
                &[&label],
            ) == 1.0
        },
    );
}

const STREAMS: usize = 200;

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn certificate_reload_while_200_connections_stream() {
    let dir = test_dir("reload");
    let old = TestPki::generate();
    let new = TestPki::generate();
    let mut volume = SecretVolume::new(&dir.join("certs"), &old);
    let port = free_port();
    let config = format!(
        "[certs]\nreload_interval_ms = 200\n{}",
        volume.listener("web", port, echo_upstream())
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let addr = agent_addr(port);

    // 200 sessions on the old certificate, each echoing 1 KiB round trips until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let trips: Arc<Vec<AtomicU64>> = Arc::new((0..STREAMS).map(|_| AtomicU64::new(0)).collect());
    let old_trust = trusting(&[&old]);
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (stop, trips, trust) = (stop.clone(), trips.clone(), old_trust.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = connect(addr, trust, "localhost")?;
                let payload: Vec<u8> = (0..1024).map(|b| (b as u8) ^ (i as u8)).collect();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    echo(&mut c, &payload).map_err(|e| format!("stream {i} trip {n}: {e}"))?;
                    n += 1;
                    trips[i].store(n, Ordering::Relaxed);
                }
                finish(c);
                Ok(n)
            })
        })
        .collect();
    eventually(Duration::from_secs(120), "200 sessions streaming", || {
        trips.iter().all(|t| t.load(Ordering::Relaxed) > 0)
    });

    // The kubelet swaps the Secret's files.
    volume.publish(&new.server_cert_pem, &new.server_key_pem);
    // Probes trust both CAs: a probe refusing the old certificate would be a failed handshake.
    let both = trusting(&[&old, &new]);
    eventually(
        Duration::from_secs(20),
        "the new certificate on new handshakes",
        || served_leaf(addr, both.clone()) == Some(new.server_cert.clone()),
    );
    // Established sessions go on after the swap.
    let before: Vec<u64> = trips.iter().map(|t| t.load(Ordering::Relaxed)).collect();
    eventually(
        Duration::from_secs(60),
        "every session to move after the swap",
        || {
            trips
                .iter()
                .zip(&before)
                .all(|(t, b)| t.load(Ordering::Relaxed) > *b)
        },
    );

    // A certificate that does not fit its key: the new one keeps serving, and it is reported.
    volume.publish(&old.server_cert_pem, &new.server_key_pem);
    until_reload_fails(&agent, "web");
    assert_eq!(
        served_leaf(addr, both.clone()),
        Some(new.server_cert.clone()),
        "the previous certificate serves"
    );

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for s in streams {
        total += s.join().expect("stream thread").expect("stream unbroken");
    }
    println!("{STREAMS} sessions, {total} round trips, unbroken across the reload");

    // Every one of the 200 closed cleanly; no handshake failed; one reload loaded, one failed
    // and was logged once.
    eventually(
        Duration::from_secs(30),
        "the 200 connections' reports",
        || agent.log_text().matches("connection closed").count() >= STREAMS,
    );
    let log = agent.log_text();
    assert_eq!(log.matches("connection failed").count(), 0, "{log}");
    // On the data path this kernel gives terminate: kTLS in the guests.
    let (path, _) = tlsplice_tests::expected_auto_path();
    assert!(
        log.matches(&format!("data_path={path} ")).count() >= STREAMS,
        "{log}"
    );
    assert_eq!(
        log.matches("changed but does not load").count(),
        1,
        "one line for the bad certificate:\n{log}"
    );
    let m = agent.metrics();
    assert_eq!(
        metric(&m, "tlsplice_handshakes_total", &["listener=\"web\""]),
        metric(
            &m,
            "tlsplice_handshakes_total",
            &["listener=\"web\"", "outcome=\"ok\""]
        ),
        "a handshake failed:\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tlsplice_certificate_reloads_total",
            &["outcome=\"loaded\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tlsplice_certificate_reloads_total",
            &["outcome=\"failed\""]
        ),
        1.0,
        "{m}"
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sighup_reloads_certificates_at_once() {
    let dir = test_dir("sighup");
    let old = TestPki::generate();
    let new = TestPki::generate();
    let files = old.write_files();
    let port = free_port();
    // Files are checked hourly here: only SIGHUP can make the change visible in time.
    let config = format!(
        "[certs]\nreload_interval_ms = 3600000\n{}",
        terminate_listener("web", port, echo_upstream(), &files)
    );
    let mut agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let addr = agent_addr(port);
    let both = trusting(&[&old, &new]);
    std::fs::write(files.join("server.pem"), &new.server_cert_pem).expect("cert");
    std::fs::write(files.join("server.key"), &new.server_key_pem).expect("key");
    assert_eq!(
        served_leaf(addr, both.clone()),
        Some(old.server_cert.clone()),
        "reloaded without SIGHUP"
    );
    agent.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the certificate after SIGHUP",
        || served_leaf(addr, both.clone()) == Some(new.server_cert.clone()),
    );
    assert!(
        agent.log_text().contains("trigger=SIGHUP"),
        "{}",
        agent.log_text()
    );
    assert!(agent.child_running(), "SIGHUP stopped the agent");
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn limits_refuse_cleanly_and_count() {
    let dir = test_dir("limits");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let (a, b) = (free_port(), free_port());
    let upstream = echo_upstream();
    let config = format!(
        "[limits]\nmax_connections = 3\nmax_handshakes = 1\nhandshake_queue = 0\n{}max_connections = 2\n{}",
        terminate_listener("a", a, upstream, &files),
        terminate_listener("b", b, upstream, &files)
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let trust = trusting(&[&pki]);

    // A client that connects and says nothing holds no handshake place.
    let silent = TcpStream::connect(agent_addr(b)).expect("connect");
    std::thread::sleep(Duration::from_millis(300));
    let c = connect(agent_addr(a), trust.clone(), "localhost").expect("a handshake");
    finish(c);
    // The handshake limit: a client that sent part of its ClientHello holds the only place.
    let mut stalled = TcpStream::connect(agent_addr(b)).expect("connect");
    stalled
        .write_all(&pki.client_hello()[..20])
        .expect("part of a ClientHello");
    std::thread::sleep(Duration::from_millis(300));
    let refused = connect(agent_addr(a), trust.clone(), "localhost");
    assert!(refused.is_err(), "a second handshake was let in");
    // One after the other: the silent one's end would otherwise meet the limit too.
    let ended = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while agent
            .log_text()
            .matches("reason=handshake peer closed ")
            .count()
            != n
        {
            assert!(
                Instant::now() < deadline,
                "{n} clients' ends:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    drop(stalled);
    ended(1);
    drop(silent);
    ended(2);

    // The listener limit: a third session on "a" is closed at once (a FIN: read gives EOF).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(agent_addr(a), trust.clone(), "localhost").expect("session on a");
        echo(&mut c, b"x").expect("echo");
        held.push(c);
    }
    let mut third = TcpStream::connect(agent_addr(a)).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert_eq!(third.read(&mut buf).expect("a FIN, not a reset"), 0);

    // The node limit: 2 on "a" and 1 on "b" fill the 3 places; the next on "b" is refused.
    let mut c = connect(agent_addr(b), trust.clone(), "localhost").expect("session on b");
    echo(&mut c, b"y").expect("echo");
    held.push(c);
    let refused = connect(agent_addr(b), trust.clone(), "localhost");
    assert!(refused.is_err(), "a fourth connection was let in");

    // Places come back when connections end.
    for c in held {
        finish(c);
    }
    eventually(Duration::from_secs(10), "the sessions' reports", || {
        metric(
            &agent.metrics(),
            "tlsplice_connections_total",
            &["outcome=\"ok\""],
        ) == 4.0
    });
    let mut c = connect(agent_addr(b), trust.clone(), "localhost").expect("a place again");
    echo(&mut c, b"z").expect("echo");
    finish(c);

    let m = agent.metrics();
    for (listener, reason) in [
        ("a", "handshake limit"),
        ("a", "listener connection limit"),
        ("b", "connection limit"),
    ] {
        assert_eq!(
            metric(
                &m,
                "tlsplice_connections_total",
                &[
                    &format!("listener=\"{listener}\""),
                    &format!("outcome=\"{reason}\"")
                ]
            ),
            1.0,
            "{listener} {reason}:\n{m}"
        );
    }
    let log = agent.log_text();
    for reason in ["handshake limit", "listener connection limit"] {
        assert_eq!(
            log.matches(&format!("reason={reason} ")).count(),
            1,
            "one log line for {reason}:\n{log}"
        );
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sigterm_drains_then_closes_what_is_left() {
    let dir = test_dir("drain");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let port = free_port();
    let config = format!(
        "[limits]\ndrain_timeout_ms = 3000\n{}",
        terminate_listener("web", port, echo_upstream(), &files)
    );
    let mut agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let trust = trusting(&[&pki]);
    let mut busy = connect(agent_addr(port), trust.clone(), "localhost").expect("busy");
    let mut idle = connect(agent_addr(port), trust.clone(), "localhost").expect("idle");
    echo(&mut busy, b"before").expect("echo");
    echo(&mut idle, b"before").expect("echo");

    let signalled = Instant::now();
    agent.signal(libc::SIGTERM);
    eventually(Duration::from_secs(5), "/readyz to say draining", || {
        agent.get("/readyz") == (503, "draining\n".to_owned())
    });
    // No new connections: the listener is closed.
    eventually(Duration::from_secs(5), "the listener to close", || {
        agent
            .log_text()
            .contains("listener closed; draining its connections")
    });
    let err = TcpStream::connect(agent_addr(port)).expect_err("the listener still accepts");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // An established connection keeps working during the drain and ends on its own.
    for _ in 0..5 {
        echo(&mut busy, b"during the drain").expect("echo while draining");
        std::thread::sleep(Duration::from_millis(100));
    }
    finish(busy);
    // The idle one is closed at the deadline.
    let mut buf = [0u8; 16];
    let closed = idle.sock.read(&mut buf);
    let waited = signalled.elapsed();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    let status = agent.terminate().expect("the agent exits after the drain");
    assert!(status.success(), "{status}");
    let log = agent.log_text();
    assert_eq!(log.matches("outcome=drain deadline ").count(), 1, "{log}");
    assert_eq!(log.matches("connection closed").count(), 1, "{log}");
    assert!(log.contains("stopped"), "{log}");
}

/// An upstream that greets each connection with `tag` and a newline, then echoes.
fn tagged_upstream(tag: &'static str) -> SocketAddr {
    serve(move |mut sock| {
        if writeln!(sock, "{tag}").is_ok() {
            let _ = std::io::copy(&mut &sock, &mut &sock);
        }
    })
}

/// Reads the upstream's greeting line through a session.
fn greeting(c: &mut Client) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        c.read_exact(&mut byte).expect("greeting");
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).trim().to_owned()
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn sighup_adds_changes_and_removes_listeners_without_dropping_connections() {
    let dir = test_dir("hup-listeners");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let (keep, gone, change, new) = (free_port(), free_port(), free_port(), free_port());
    let (one, two) = (tagged_upstream("upstream-1"), tagged_upstream("upstream-2"));
    let v1 = format!(
        "[limits]\ndrain_timeout_ms = 60000\n{}{}{}",
        terminate_listener("keep", keep, one, &files),
        terminate_listener("gone", gone, one, &files),
        terminate_listener("change", change, one, &files),
    );
    let mut agent = AgentProcess::start(&dir, &v1, &[], &pin_args());
    let config_path = agent.config.clone();
    let trust = trusting(&[&pki]);
    let session = |port: u16| {
        let mut c = connect(agent_addr(port), trust.clone(), "localhost").expect("session");
        let tag = greeting(&mut c);
        (c, tag)
    };
    let (mut on_keep, _) = session(keep);
    let (mut on_gone, _) = session(gone);
    let (mut on_change, tag) = session(change);
    assert_eq!(tag, "upstream-1");

    // A configuration that does not load changes nothing, and says so.
    std::fs::write(&config_path, format!("{v1}[[listener]]\nname = \"keep\"\n")).expect("write");
    agent.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the refusal", || {
        agent
            .log_text()
            .contains("the configuration does not load: nothing changed")
    });
    // A listener that cannot bind (its port is taken) changes nothing either.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr").port();
    std::fs::write(
        &config_path,
        format!("{v1}{}", terminate_listener("squat", taken, one, &files)),
    )
    .expect("write");
    agent.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the bind failure", || {
        agent
            .log_text()
            .contains("the new listeners could not be set up: nothing changed")
    });
    drop(squatter);

    // keep as it was, gone removed, change pointed at upstream 2, new added.
    let v2 = format!(
        "[limits]\ndrain_timeout_ms = 60000\n{}{}{}",
        terminate_listener("keep", keep, one, &files),
        terminate_listener("change", change, two, &files),
        terminate_listener("new", new, two, &files),
    );
    std::fs::write(&config_path, &v2).expect("write");
    agent.signal(libc::SIGHUP);
    eventually(Duration::from_secs(10), "the reload", || {
        agent.log_text().contains("SIGHUP: configuration reloaded")
    });
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("SIGHUP: configuration reloaded"))
        .expect("reload line");
    assert!(
        line.contains("added=[\"new\"]")
            && line.contains("removed=[\"gone\"]")
            && line.contains("changed=[\"change\"]")
            && line.contains("unchanged=[\"keep\"]"),
        "{line}"
    );

    // Every established connection goes on, the removed listener's included (it drains).
    for c in [&mut on_keep, &mut on_gone, &mut on_change] {
        echo(c, b"after the reload").expect("established connection after the reload");
    }
    // New connections: refused on the removed listener, the new settings on the changed one,
    // served on the new one.
    let err = TcpStream::connect(agent_addr(gone)).expect_err("the removed listener accepts");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let (c, tag) = session(change);
    assert_eq!(
        tag, "upstream-2",
        "a new connection on the changed listener"
    );
    finish(c);
    let (c, tag) = session(new);
    assert_eq!(tag, "upstream-2");
    finish(c);
    for c in [on_keep, on_gone, on_change] {
        finish(c);
    }

    let (_, body) = agent.get("/config");
    let effective: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let names: Vec<&str> = effective["listener"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names, ["keep", "change", "new"]);
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "tlsplice_config_reloads_total",
            &["outcome=\"applied\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tlsplice_config_reloads_total",
            &["outcome=\"refused\""]
        ),
        2.0
    );
    eventually(Duration::from_secs(10), "every connection's report", || {
        agent.log_text().matches("connection closed").count() == 5
    });
    assert_eq!(agent.log_text().matches("connection failed").count(), 0);
    assert!(agent.child_running());
}

/// Sends a few bytes every 100 ms for `busy`, each echoed back, then waits for the agent to
/// close the idle connection; returns how long that took after the last byte.
fn busy_then_idle(mut s: TcpStream, first: &[u8], busy: Duration) -> Duration {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(first).expect("first flight");
    let mut back = vec![0u8; first.len()];
    s.read_exact(&mut back).expect("first flight echoed");
    let until = Instant::now() + busy;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"tick").expect("still open while busy");
        let mut tick = [0u8; 4];
        s.read_exact(&mut tick).expect("tick echoed");
    }
    let quiet = Instant::now();
    let mut buf = [0u8; 64];
    let closed = s.read(&mut buf);
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the idle connection was not closed: {closed:?}"
    );
    quiet.elapsed()
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn idle_connections_are_closed_on_every_data_path() {
    let dir = test_dir("idle");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let upstream = echo_upstream();
    let (auto, user, pass) = (free_port(), free_port(), free_port());
    let config = format!(
        "{}idle_timeout_ms = 500\n{}idle_timeout_ms = 500\ndata_path = \"userspace\"\n\
         [[listener]]\nname = \"pass\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:{pass}\"\n\
         upstream = \"{upstream}\"\nidle_timeout_ms = 500\n",
        terminate_listener("auto", auto, upstream, &files),
        terminate_listener("user", user, upstream, &files),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let busy = Duration::from_millis(1500);
    let threads: Vec<_> = [("auto", auto), ("user", user)]
        .into_iter()
        .map(|(name, port)| {
            let trust = trusting(&[&pki]);
            std::thread::spawn(move || {
                let mut c = connect(agent_addr(port), trust, "localhost").expect("session");
                echo(&mut c, b"first").expect("echo");
                let until = Instant::now() + busy;
                while Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(100));
                    echo(&mut c, b"tick").expect("still open while busy");
                }
                let quiet = Instant::now();
                let mut buf = [0u8; 64];
                let closed = c.read(&mut buf);
                assert!(
                    matches!(closed, Ok(0) | Err(_)),
                    "{name}: the idle connection was not closed: {closed:?}"
                );
                quiet.elapsed()
            })
        })
        .collect();
    let hello = pki.client_hello();
    let plain = TcpStream::connect(agent_addr(pass)).expect("connect");
    let quiet = busy_then_idle(plain, &hello, busy);
    println!("pass: closed {quiet:?} after the last byte");
    assert!(
        quiet >= Duration::from_millis(400) && quiet < Duration::from_secs(5),
        "{quiet:?}"
    );
    for (t, name) in threads.into_iter().zip(["auto", "user"]) {
        let quiet = t.join().expect("client");
        println!("{name}: closed {quiet:?} after the last byte");
        assert!(
            quiet >= Duration::from_millis(400) && quiet < Duration::from_secs(5),
            "{quiet:?}"
        );
    }
    eventually(Duration::from_secs(10), "three reports", || {
        metric(&agent.metrics(), "tlsplice_connections_total", &[]) == 3.0
    });
    let m = agent.metrics();
    let (tls_path, _) = tlsplice_tests::expected_auto_path();
    for (listener, path) in [
        ("auto", tls_path.to_string()),
        ("user", "userspace".to_owned()),
        ("pass", "splice".to_owned()),
    ] {
        assert_eq!(
            metric(
                &m,
                "tlsplice_connections_total",
                &[
                    &format!("listener=\"{listener}\""),
                    &format!("data_path=\"{path}\""),
                    "outcome=\"idle timeout\""
                ]
            ),
            1.0,
            "{listener}:\n{m}"
        );
    }
    let log = agent.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("outcome=idle timeout ")
                && l.contains("error=no byte either way for 500 ms"))
            .count(),
        3,
        "{log}"
    );
}

/// A spliced connection (kTLS in the guests, splice) parks after a second without bytes, with
/// no task of its own, and is still closed `idle_timeout_ms` after its last byte: the time it
/// spent running before it parked counts (a connection that parks does not live longer).
#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn parked_connections_idle_out_counted_from_their_last_byte() {
    let dir = test_dir("idle-parked");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let upstream = echo_upstream();
    let (auto, pass) = (free_port(), free_port());
    let config = format!(
        "{}idle_timeout_ms = 3000
[[listener]]
name = \"pass\"
mode = \"passthrough\"
\
         listen = \"127.0.0.1:{pass}\"
upstream = \"{upstream}\"
idle_timeout_ms = 3000
",
        terminate_listener("auto", auto, upstream, &files),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let (tls_path, _) = tlsplice_tests::expected_auto_path();
    // The user-space path never parks; on a kTLS kernel both connections do.
    let parks = if tls_path == tlsplice::outcome::DataPath::Userspace {
        1.0
    } else {
        2.0
    };
    let trust = trusting(&[&pki]);
    let mut tls = connect(agent_addr(auto), trust, "localhost").expect("session");
    echo(&mut tls, b"first").expect("echo");
    let tls_last = Instant::now();
    let hello = pki.client_hello();
    let mut plain = TcpStream::connect(agent_addr(pass)).expect("connect");
    plain.write_all(&hello).expect("hello");
    let mut back = vec![0u8; hello.len()];
    plain.read_exact(&mut back).expect("hello echoed");
    let plain_last = Instant::now();
    eventually(
        Duration::from_secs(3),
        "the idle connections parked",
        || metric(&agent.metrics(), "tlsplice_parked_connections", &[]) == parks,
    );
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Each read in its own thread: each connection's close is timed on its own.
    let plain_closed = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let closed = plain.read(&mut buf);
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        plain_last.elapsed()
    });
    let mut buf = [0u8; 64];
    let closed = tls.read(&mut buf);
    let tls_quiet = tls_last.elapsed();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let plain_quiet = plain_closed.join().expect("the splice client");
    println!("closed {tls_quiet:?} ({tls_path}) and {plain_quiet:?} (splice) after the last byte");
    // A parked connection is closed when its timeout has passed since the byte its relay last
    // moved (3 s), a running one at its watch's next look (every quarter of the timeout, so
    // within 3.75 s). Counted from the park instead, it would be 4 s or more.
    let parked_limit = Duration::from_millis(3600);
    let tls_limit = if parks == 2.0 {
        parked_limit
    } else {
        Duration::from_millis(3950)
    };
    for (quiet, limit) in [(tls_quiet, tls_limit), (plain_quiet, parked_limit)] {
        assert!(
            quiet >= Duration::from_millis(2900) && quiet < limit,
            "closed {quiet:?} after the last byte (limit {limit:?})"
        );
    }
    eventually(Duration::from_secs(10), "two idle reports", || {
        let m = agent.metrics();
        metric(
            &m,
            "tlsplice_connections_total",
            &["outcome=\"idle timeout\""],
        ) == 2.0
            && metric(&m, "tlsplice_parked_connections", &[]) == 0.0
    });
}

/// Runs openssl with `args` in `dir`, or panics with its output. Its configuration is a
/// minimal one written there (the guests have no /usr/lib/ssl/openssl.cnf).
fn openssl(openssl: &Path, dir: &Path, args: &[&str]) {
    let conf = dir.join("openssl.cnf");
    std::fs::write(&conf, "[req]\ndistinguished_name = dn\n[dn]\n").expect("openssl.cnf");
    let out = Command::new(openssl)
        .args(args)
        .current_dir(dir)
        .env("OPENSSL_CONF", &conf)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn keys_in_sec1_pkcs1_and_pkcs8_serve_and_a_near_expiry_warns() {
    let test = "keys_in_sec1_pkcs1_and_pkcs8_serve_and_a_near_expiry_warns";
    let Some(openssl_bin) = tlsplice_tests::tool_or_skip(test, "openssl") else {
        return;
    };
    let dir = test_dir("keys");
    // Three keys as operators get them from openssl: SEC1 ("EC PRIVATE KEY"), PKCS#1 ("RSA
    // PRIVATE KEY") and PKCS#8 ("PRIVATE KEY"), each with a self-signed certificate for
    // localhost valid for two days.
    let keys = [
        (
            "sec1",
            "EC PRIVATE KEY",
            vec![
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sec1.key",
            ],
        ),
        (
            "pkcs1",
            "RSA PRIVATE KEY",
            vec!["genrsa", "-traditional", "-out", "pkcs1.key", "2048"],
        ),
        (
            "pkcs8",
            "BEGIN PRIVATE KEY",
            vec!["genpkey", "-algorithm", "ed25519", "-out", "pkcs8.key"],
        ),
    ];
    let mut config = String::from("[certs]\nexpiry_warning_days = 14\n");
    let upstream = echo_upstream();
    let mut ports = Vec::new();
    for (name, marker, genkey) in &keys {
        openssl(&openssl_bin, &dir, genkey);
        let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).expect("key");
        assert!(key.contains(marker), "{name}: {key}");
        openssl(
            &openssl_bin,
            &dir,
            &[
                "req",
                "-x509",
                "-key",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
            ],
        );
        let port = free_port();
        ports.push((*name, port));
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:{port}\"\n\
             upstream = \"{upstream}\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n",
            d = dir.display()
        ));
    }
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    for (name, port) in &ports {
        let mut roots = RootCertStore::empty();
        let pem = std::fs::read(dir.join(format!("{name}.pem"))).expect("cert");
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.expect("cert")).expect("root");
        }
        let trust = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let mut c = connect(agent_addr(*port), trust, "localhost")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        echo(&mut c, name.as_bytes()).expect("echo");
        finish(c);
    }
    // Two days left, under the 14-day threshold: one warning per certificate, and the gauge.
    let log = agent.log_text();
    for (name, _) in &ports {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("certificate expires soon")
                    && l.contains(&format!("listener={name} ")))
                .count(),
            1,
            "{name}:\n{log}"
        );
    }
    let m = agent.metrics();
    for (name, _) in &ports {
        let left = metric(
            &m,
            "tlsplice_certificate_expiry_seconds",
            &[&format!("listener=\"{name}\"")],
        );
        assert!(
            (86_400.0 * 1.9..=86_400.0 * 2.0).contains(&left),
            "{name}: {left}"
        );
    }
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn relayed_sockets_send_small_writes_at_once() {
    // Without TCP_NODELAY a relay holds a small write back until the previous one is
    // acknowledged, and the peer delays that ACK by up to 40 ms: request/response traffic
    // stalls (cargo xtask bench measured p99 in tens of milliseconds before this was set).
    let dir = test_dir("nodelay");
    let pki = TestPki::generate();
    let pki_dir = pki.write_files();
    let port = free_port();
    let upstream = echo_upstream();
    // And a passthrough listener in front of a TLS echo upstream.
    let tls_upstream = {
        let config = pki.server_config();
        serve(move |sock| {
            let conn = rustls::ServerConnection::new(config.clone()).expect("server");
            let mut tls = StreamOwned::new(conn, sock);
            let mut buf = [0u8; 4096];
            while let Ok(n) = tls.read(&mut buf) {
                if n == 0 || tls.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })
    };
    let pass_port = free_port();
    let config = format!(
        "{}[[listener]]\nname = \"edge\"\nmode = \"passthrough\"\nlisten = \"127.0.0.1:{pass_port}\"\n\
         upstream = \"{tls_upstream}\"\n",
        terminate_listener("web", port, upstream, &pki_dir)
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    for (listen, to) in [(port, upstream), (pass_port, tls_upstream)] {
        let mut client =
            connect(agent_addr(listen), trusting(&[&pki]), "localhost").expect("session");
        echo(&mut client, b"ping").expect("echo");
        // Each once: the agent holds no second descriptor of a relayed socket.
        let relayed: Vec<_> = agent
            .connected_tcp_sockets()
            .into_iter()
            .filter(|s| s.local.port() == listen || s.peer == to)
            .collect();
        assert_eq!(
            relayed.len(),
            2,
            "a client leg and an upstream leg through port {listen}: {relayed:?}"
        );
        for s in &relayed {
            assert!(s.nodelay, "TCP_NODELAY is not set on {s:?}");
        }
        finish(client);
    }
}

/// Reads until the agent closes the connection (or 10 s pass), so each failure below has ended
/// before the next starts.
fn until_closed(mut sock: TcpStream) {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
}

#[test]
#[ignore = "kernel-dependent: runs in the VM kernel matrix (cargo xtask test)"]
fn failures_are_counted_under_their_typed_reason() {
    let dir = test_dir("reasons");
    let pki = TestPki::generate();
    let files = pki.write_files();
    let upstream = echo_upstream();
    let (web, user, dead, edge) = (free_port(), free_port(), free_port(), free_port());
    // Nothing listens there: the upstream of "dead" refuses every connection.
    let refused = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        "{}{}data_path = \"userspace\"\n{}[[listener]]\nname = \"edge\"\nmode = \"passthrough\"\n\
         listen = \"127.0.0.1:{edge}\"\n[listener.sni]\n\"a.test\" = \"{upstream}\"\n",
        terminate_listener("web", web, upstream, &files)
            .replace("handshake_timeout_ms = 5000", "handshake_timeout_ms = 400"),
        terminate_listener("user", user, upstream, &files),
        terminate_listener("dead", dead, refused, &files),
    );
    let agent = AgentProcess::start(&dir, &config, &[], &pin_args());
    let trust = trusting(&[&pki]);

    // Client leg: not TLS at all, a ClientHello cut short, nothing within the deadline.
    let mut plain = TcpStream::connect(agent_addr(web)).expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .expect("write");
    until_closed(plain);
    let mut cut = TcpStream::connect(agent_addr(web)).expect("connect");
    cut.write_all(&pki.client_hello()[..20]).expect("write");
    drop(cut);
    until_closed(TcpStream::connect(agent_addr(web)).expect("connect"));
    // A session whose client closes TCP without close_notify (user space, where the agent reads
    // the records itself and must see the truncation).
    let mut c = connect(agent_addr(user), trust.clone(), "localhost").expect("session");
    echo(&mut c, b"before the truncation").expect("echo");
    c.sock
        .shutdown(std::net::Shutdown::Write)
        .expect("FIN without close_notify");
    let mut rest = Vec::new();
    let _ = c.sock.read_to_end(&mut rest);
    // A complete client session whose upstream refuses the connection: the client gets
    // close_notify.
    let mut c = connect(agent_addr(dead), trust.clone(), "localhost").expect("session");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    // Passthrough: not TLS, a server name with no route, a ClientHello that does not parse.
    let mut not_tls = TcpStream::connect(agent_addr(edge)).expect("connect");
    not_tls
        .write_all(b"SSH-2.0-OpenSSH_9.6\r\n")
        .expect("write");
    until_closed(not_tls);
    let mut unknown = TcpStream::connect(agent_addr(edge)).expect("connect");
    unknown.write_all(&pki.client_hello()).expect("write");
    until_closed(unknown);
    let mut malformed = TcpStream::connect(agent_addr(edge)).expect("connect");
    malformed
        .write_all(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3])
        .expect("write");
    until_closed(malformed);

    let expected = [
        ("web", "none", "handshake failed"),
        ("web", "none", "handshake peer closed"),
        ("web", "none", "handshake timeout"),
        ("user", "userspace", "truncated"),
        ("dead", "none", "upstream unreachable"),
        ("edge", "none", "not TLS"),
        ("edge", "none", "unknown SNI"),
        ("edge", "none", "malformed ClientHello"),
    ];
    eventually(Duration::from_secs(10), "every connection counted", || {
        metric(&agent.metrics(), "tlsplice_connections_total", &[]) == expected.len() as f64
    });
    let m = agent.metrics();
    for (listener, path, outcome) in expected {
        assert_eq!(
            metric(
                &m,
                "tlsplice_connections_total",
                &[
                    &format!("listener=\"{listener}\""),
                    &format!("data_path=\"{path}\""),
                    &format!("outcome=\"{outcome}\"")
                ]
            ),
            1.0,
            "{listener} {outcome}:\n{m}"
        );
    }
    // The client handshakes that ran are counted by how they ended (the silent client never
    // started one); the upstream handshake of "dead" never ran.
    for (outcome, n) in [
        ("handshake failed", 1.0),
        ("handshake peer closed", 1.0),
        ("ok", 2.0),
    ] {
        assert_eq!(
            metric(
                &m,
                "tlsplice_handshakes_total",
                &[&format!("outcome=\"{outcome}\"")]
            ),
            n,
            "handshakes {outcome}:\n{m}"
        );
    }
    // One log line each, naming the typed outcome.
    let log = agent.log_text();
    for (listener, _, outcome) in expected {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("connection failed")
                    && l.contains(&format!("listener={listener} "))
                    && l.contains(&format!("outcome={outcome} ")))
                .count(),
            1,
            "{listener} {outcome}:\n{log}"
        );
    }
    assert_eq!(
        log.matches("connection failed").count(),
        expected.len(),
        "{log}"
    );
}
