//! `cargo xtask scan`: real TLS tools on the host against a terminate listener, on the host's
//! agent (user space) and on an agent in each kTLS guest reached through forwarded ports
//! (`cargo xtask vm --forward`):
//! - openssl s_client's post-handshake commands: `k` and `K` (TLS 1.3 KeyUpdate, not
//!   requested and requested) with data before and after each, and `R` (TLS 1.2
//!   renegotiation, which the agent refuses);
//! - testssl.sh's protocol, cipher, server-default and vulnerability checks, with what it
//!   finds asserted: TLS 1.2 and 1.3 only, AEAD suites only, no known vulnerability;
//! - Debian sid's openssl (3.6: Debian 12's has no ML-KEM) offering only the post-quantum
//!   hybrid X25519MLKEM768, which the agent's built-in policy must take, data echoed after.
//!
//! The agent's own counters (`/metrics`) then say which data path the scan's connections took.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{bootstrap, cmd, kernels, matrix, peers, vm};

/// What one scan found, for the summary.
struct Scan {
    place: String,
    lines: Vec<String>,
}

/// Runs the scan on the host, then (unless `host_only`) in each guest of `kernel_names`.
pub fn run(root: &Path, kernel_names: &[&str], host_only: bool) -> Result<()> {
    bootstrap::run()?;
    bootstrap::scan_tools()?;
    let agent = matrix::build_agent(root)?;
    let work = root.join("target/scan");
    std::fs::create_dir_all(&work)?;
    let mut pki = Pki::generate(&work)?;
    // The newest OpenSSL (the bench's peers, cached): without it, the post-quantum check says
    // why it did not run.
    pki.pq_openssl = peers::fetch(false)
        .and_then(|newest| {
            let path = peers::host_openssl(&newest)?;
            Ok((path, newest.openssl))
        })
        .map_err(|e| format!("{e:#}"));
    let mut scans = vec![scan_host(&work, &agent, &pki)?];
    if !host_only {
        for kernel_name in kernel_names {
            scans.push(scan_guest(root, &work, kernel_name, &agent, &pki)?);
        }
    }
    println!("\nscan:");
    for s in &scans {
        println!("  {}:", s.place);
        for l in &s.lines {
            println!("    {l}");
        }
    }
    Ok(())
}

/// A self-signed certificate for "localhost" (it is also the clients' trust anchor).
struct Pki {
    cert: String,
    key: String,
    cert_path: PathBuf,
    /// An openssl with ML-KEM on this host and its version, or why there is none.
    pq_openssl: std::result::Result<(PathBuf, String), String>,
}

impl Pki {
    fn generate(work: &Path) -> Result<Self> {
        let (cert_path, key_path) = (work.join("server.pem"), work.join("server.key"));
        cmd::output(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
                .args([
                    "-subj",
                    "/CN=localhost",
                    "-addext",
                    "subjectAltName=DNS:localhost",
                ])
                .arg("-keyout")
                .arg(&key_path)
                .arg("-out")
                .arg(&cert_path),
        )?;
        Ok(Self {
            cert: std::fs::read_to_string(&cert_path)?,
            key: std::fs::read_to_string(&key_path)?,
            cert_path,
            pq_openssl: Err("not looked for".into()),
        })
    }
}

/// A terminate listener on `listen` forced onto `data_path`, in front of an echo upstream.
fn config(listen: SocketAddr, admin: SocketAddr, echo: u16, dir: &str, data_path: &str) -> String {
    format!(
        "[admin]\nlisten = \"{admin}\"\n\n[[listener]]\nname = \"scan\"\nmode = \"terminate\"\n\
         listen = \"{listen}\"\nupstream = \"127.0.0.1:{echo}\"\ncert = \"{dir}/server.pem\"\n\
         key = \"{dir}/server.key\"\ndata_path = \"{data_path}\"\n"
    )
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn scan_host(work: &Path, agent: &Path, pki: &Pki) -> Result<Scan> {
    let dir = work.join("host");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("server.pem"), &pki.cert)?;
    std::fs::write(dir.join("server.key"), &pki.key)?;
    let (tls, admin, echo) = (free_port()?, free_port()?, free_port()?);
    let text = config(
        SocketAddr::from(([127, 0, 0, 1], tls)),
        SocketAddr::from(([127, 0, 0, 1], admin)),
        echo,
        &dir.to_string_lossy(),
        "auto",
    );
    std::fs::write(dir.join("scan.toml"), text)?;
    let mut upstream = Command::new("busybox")
        .args(["nc", "-ll", "-p", &echo.to_string(), "-e", "cat"])
        .spawn()
        .context("starting busybox nc as the echo upstream")?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut agent = Command::new(agent)
        .arg("run")
        .arg("--config")
        .arg(dir.join("scan.toml"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    let result = checks(
        "host",
        SocketAddr::from(([127, 0, 0, 1], tls)),
        SocketAddr::from(([127, 0, 0, 1], admin)),
        pki,
        &dir,
        false,
        Rekey::Follows,
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = upstream.kill();
    let _ = upstream.wait();
    result
}

fn scan_guest(
    root: &Path,
    work: &Path,
    kernel_name: &str,
    agent: &Path,
    pki: &Pki,
) -> Result<Scan> {
    let line = kernels::line(kernel_name)?;
    let kernel = kernels::fetch(line, false)?;
    // The kernel's TLS takes a peer's new keys from 6.14 on; before, the agent refuses a
    // KeyUpdate with internal_error (outcome `rekey unsupported`).
    let rekeys = if kernel.version() >= (6, 14) {
        Rekey::Follows
    } else {
        Rekey::Refused
    };
    let (tls, admin, stop) = (free_port()?, free_port()?, free_port()?);
    let guest = |port| SocketAddr::from(([0, 0, 0, 0], port));
    let text = config(guest(tls), guest(admin), 9000, "/tmp/scan", "auto");
    // The host releases the guest by connecting to `stop` once it is done.
    let script = format!(
        "mkdir -p /tmp/scan\n\
         cat > /tmp/scan/server.pem <<'TLSPLICE_EOF'\n{cert}TLSPLICE_EOF\n\
         cat > /tmp/scan/server.key <<'TLSPLICE_EOF'\n{key}TLSPLICE_EOF\n\
         cat > /tmp/scan/scan.toml <<'TLSPLICE_EOF'\n{text}TLSPLICE_EOF\n\
         nc -ll -p 9000 -e cat &\n\
         tlsplice run --config /tmp/scan/scan.toml > /tmp/scan/agent.log 2>&1 &\n\
         agent=$!\n\
         echo TLSPLICE-SCAN-WAITING\n\
         nc -l -p {stop} > /dev/null\n\
         kill $agent; sleep 1\n\
         grep -c 'outcome' /tmp/scan/agent.log\n\
         grep -v 'outcome=ok' /tmp/scan/agent.log | tail -20\n",
        cert = pki.cert,
        key = pki.key,
    );
    let image = matrix::guest_image(root, &kernel, agent, &[], &[], &script)?;
    let ports = [tls, admin, stop];
    let label = format!("scan {kernel_name}");
    let boot = std::thread::spawn(move || {
        vm::boot(
            &kernel,
            &image,
            &label,
            Duration::from_secs(1800),
            vm::TEST_MEMORY_MIB,
            &ports,
            vm::Clock::Host,
        )
    });
    let listen = SocketAddr::from(([127, 0, 0, 1], tls));
    let result = checks(
        &format!("guest {kernel_name}"),
        listen,
        SocketAddr::from(([127, 0, 0, 1], admin)),
        pki,
        &work.join(format!("guest-{kernel_name}")),
        true,
        rekeys,
    );
    // Release the guest whatever the checks said, then wait for it to power off.
    let released = TcpStream::connect(("127.0.0.1", stop));
    drop(released);
    let run = boot
        .join()
        .map_err(|_| anyhow::anyhow!("the guest thread panicked"))??;
    if run.timed_out {
        bail!("the scan guest timed out");
    }
    result
}

/// Waits until the agent at `addr` completes a TLS handshake (a forwarded port accepts before
/// anything listens behind it), for up to 5 minutes.
fn wait_for_agent(addr: SocketAddr, pki: &Pki) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-verify_return_error",
                "-servername",
                "localhost",
            ])
            .arg("-connect")
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(&pki.cert_path)
            .stdin(Stdio::null())
            .output()?;
        if out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("Verify return code: 0")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no TLS handshake from the agent at {addr} in 5 minutes");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Every check against one agent.
fn checks(
    place: &str,
    addr: SocketAddr,
    admin: SocketAddr,
    pki: &Pki,
    dir: &Path,
    want_ktls: bool,
    rekey: Rekey,
) -> Result<Scan> {
    std::fs::create_dir_all(dir)?;
    wait_for_agent(addr, pki)?;
    let mut lines = Vec::new();
    lines.push(match rekey {
        Rekey::Follows => key_updates(addr, pki)?,
        Rekey::Refused => key_update_refused(addr, pki)?,
    });
    lines.push(renegotiation(addr, pki)?);
    lines.push(post_quantum(addr, pki)?);
    lines.extend(testssl(addr, dir)?);
    let metrics = http_get(admin, "/metrics")?;
    let connections: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tlsplice_connections_total{") && !l.ends_with(" 0"))
        .collect();
    if connections.is_empty() {
        bail!("{place}: the agent counted no connection:\n{metrics}");
    }
    if want_ktls && !connections.iter().any(|l| l.contains("data_path=\"ktls\"")) {
        bail!(
            "{place}: no connection took the ktls path:\n{}",
            connections.join("\n")
        );
    }
    lines.push(format!(
        "agent's connections by outcome and path: {}",
        connections.join("; ")
    ));
    Ok(Scan {
        place: place.to_owned(),
        lines,
    })
}

/// openssl s_client in its interactive mode, with what it prints collected as it comes.
struct SClient {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

impl SClient {
    fn start(addr: SocketAddr, pki: &Pki, version: &str) -> Result<Self> {
        Self::start_with(Path::new("openssl"), addr, pki, &[version])
    }

    /// s_client of the openssl at `program`, with `args` before the usual ones.
    fn start_with(program: &Path, addr: SocketAddr, pki: &Pki, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(program)
            .arg("s_client")
            .args(args)
            .args(["-verify_return_error", "-servername", "localhost"])
            .arg("-connect")
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(&pki.cert_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting openssl s_client")?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().context("s_client stdout")?),
            Box::new(child.stderr.take().context("s_client stderr")?),
        ];
        for mut pipe in pipes {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        Ok(Self { child, out })
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Writes one line; s_client reads it on its own (a command must start what one read
    /// returns).
    fn line(&mut self, text: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("s_client stdin")?;
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing {text:?} to openssl s_client"))
    }

    /// Waits (up to 60 s) until s_client has printed `text` `count` times.
    fn wait_for(&self, text: &str, count: usize) -> Result<()> {
        self.wait_until(&format!("{text:?} ({count} times)"), |out| {
            out.matches(text).count() >= count
        })
    }

    /// Waits (up to 60 s) until what s_client printed satisfies `done`; `what` names it.
    fn wait_until(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&self.output()) {
            if Instant::now() > deadline {
                bail!("s_client never printed {what}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Closes stdin and waits (up to 60 s) for s_client to exit.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        self.output()
    }
}

/// TLS 1.3: data, `k`, data, `K` (the agent must answer with its own KeyUpdate), data.
fn key_updates(addr: SocketAddr, pki: &Pki) -> Result<String> {
    let mut c = SClient::start(addr, pki, "-tls1_3")?;
    c.line("before")?;
    c.wait_for("before\n", 1)?;
    c.line("k")?;
    c.wait_for("KEYUPDATE", 1)?;
    c.line("between")?;
    c.wait_for("between\n", 1)?;
    c.line("K")?;
    c.wait_for("KEYUPDATE", 2)?;
    c.line("after")?;
    c.wait_for("after\n", 1)?;
    c.finish();
    Ok(
        "openssl s_client -tls1_3: `k` and `K` followed, data echoed before, between and after"
            .into(),
    )
}

/// What the agent under scan does with a peer's KeyUpdate.
#[derive(Debug, Clone, Copy)]
enum Rekey {
    /// Follows it (user space, or a kernel that takes new keys: 6.14 and later).
    Follows,
    /// Refuses it with internal_error: kTLS on a kernel before 6.14.
    Refused,
}

/// TLS 1.3 on a kTLS kernel before 6.14: data, then `k`, which the agent must refuse with an
/// internal_error alert rather than decrypt what follows with a key it cannot install.
fn key_update_refused(addr: SocketAddr, pki: &Pki) -> Result<String> {
    let mut c = SClient::start(addr, pki, "-tls1_3")?;
    c.line("before")?;
    c.wait_for("before\n", 1)?;
    c.line("k")?;
    c.wait_for("KEYUPDATE", 1)?;
    // Nothing more is written: the agent's alert ends s_client, and a write to its stdin
    // could then fail with EPIPE.
    c.wait_until("an internal_error alert (the kernel cannot rekey)", |out| {
        out.contains("internal error") || out.contains("alert number 80")
    })?;
    c.finish();
    Ok(
        "openssl s_client -tls1_3: `k` refused with internal_error (the kernel cannot rekey)"
            .into(),
    )
}

/// TLS 1.3 with only X25519MLKEM768 offered, by an OpenSSL that has it: the agent's built-in
/// policy takes it, and data goes both ways after.
fn post_quantum(addr: SocketAddr, pki: &Pki) -> Result<String> {
    let (openssl, version) = match &pki.pq_openssl {
        Ok(found) => found,
        Err(why) => {
            println!("scan: the post-quantum check does not run: {why}");
            return Ok(format!("post-quantum hybrid: not checked ({why})"));
        }
    };
    let mut c = SClient::start_with(
        openssl,
        addr,
        pki,
        &["-tls1_3", "-groups", "X25519MLKEM768"],
    )?;
    c.line("post-quantum")?;
    c.wait_for("post-quantum\n", 1)?;
    let out = c.finish();
    if !out.contains("group: X25519MLKEM768") {
        bail!("s_client (OpenSSL {version}) -groups X25519MLKEM768 did not get it:\n{out}");
    }
    Ok(format!(
        "openssl s_client (OpenSSL {version}) -groups X25519MLKEM768: negotiated, data echoed"
    ))
}

/// TLS 1.2: `R` is refused with no_renegotiation (OpenSSL then ends the session itself).
fn renegotiation(addr: SocketAddr, pki: &Pki) -> Result<String> {
    let mut c = SClient::start(addr, pki, "-tls1_2")?;
    c.line("before")?;
    c.wait_for("before\n", 1)?;
    c.line("R")?;
    c.wait_for("RENEGOTIATING", 1)?;
    std::thread::sleep(Duration::from_secs(1));
    let out = c.finish();
    if !(out.contains("no renegotiation") || out.contains("no_renegotiation")) {
        bail!("s_client -tls1_2 `R` was not refused with no_renegotiation:\n{out}");
    }
    Ok("openssl s_client -tls1_2: `R` refused with no_renegotiation".into())
}

/// testssl.sh's protocol, cipher, server-default and vulnerability checks, asserted.
fn testssl(addr: SocketAddr, dir: &Path) -> Result<Vec<String>> {
    let json = dir.join("testssl.json");
    let _ = std::fs::remove_file(&json);
    let started = Instant::now();
    let out = Command::new("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "off", "--jsonfile"])
        .arg(&json)
        .args([
            "--protocols",
            "--each-cipher",
            "--server-defaults",
            "--server-preference",
            "--vulnerable",
        ])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .output()
        .context("starting testssl (Debian's testssl.sh)")?;
    std::fs::write(dir.join("testssl.txt"), &out.stdout)?;
    let took = started.elapsed();
    let text = std::fs::read_to_string(&json).with_context(|| {
        format!(
            "testssl wrote no {}: {}",
            json.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let (problems, summary) = judge_findings(&findings);
    if !problems.is_empty() {
        bail!(
            "testssl against {addr} ({}):\n{}",
            dir.join("testssl.txt").display(),
            problems.join("\n")
        );
    }
    Ok(vec![format!(
        "testssl.sh ({:.0} s): {summary}",
        took.as_secs_f64()
    )])
}

/// The ids of testssl.sh's vulnerability checks (its `--vulnerable` set that applies to a
/// TLS service that is not HTTP).
const VULNERABILITY_CHECKS: [&str; 15] = [
    "heartbleed",
    "CCS",
    "ROBOT",
    "secure_renego",
    "secure_client_renego",
    "CRIME_TLS",
    "POODLE_SSL",
    "fallback_SCSV",
    "SWEET32",
    "FREAK",
    "DROWN",
    "LOGJAM",
    "BEAST",
    "LUCKY13",
    "RC4",
];

/// What testssl.sh must find against a terminate listener: the problems, and a summary.
fn judge_findings(findings: &[serde_json::Value]) -> (Vec<String>, String) {
    let field =
        |f: &serde_json::Value, k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let by_id = |id: &str| {
        findings
            .iter()
            .find(|f| field(f, "id") == id)
            .map(|f| field(f, "finding"))
    };
    let mut problems = Vec::new();
    for (id, want) in [
        ("SSLv2", "not offered"),
        ("SSLv3", "not offered"),
        ("TLS1", "not offered"),
        ("TLS1_1", "not offered"),
        ("TLS1_2", "offered"),
        ("TLS1_3", "offered"),
    ] {
        match by_id(id) {
            Some(f) if f.starts_with(want) => {}
            other => problems.push(format!("{id}: {other:?}, expected {want:?}")),
        }
    }
    // The server's order of preference wins, in TLS 1.3 and below (issue 21).
    match by_id("cipher_order") {
        Some(f) if f == "server" => {}
        other => problems.push(format!(
            "cipher_order: {other:?}, expected \"server\" (the server's order in every version)"
        )),
    }
    let ciphers: Vec<String> = findings
        .iter()
        .filter(|f| field(f, "id").starts_with("cipher_x"))
        .map(|f| field(f, "finding"))
        .collect();
    if ciphers.is_empty() {
        problems.push("no cipher suite found".into());
    }
    for c in &ciphers {
        if !(c.contains("GCM") || c.contains("CHACHA20") || c.contains("POLY1305")) {
            problems.push(format!("a suite that is not AEAD: {c}"));
        }
    }
    // Every vulnerability check testssl.sh runs must come out OK (or not applicable): any
    // finding rated MEDIUM or worse outside the certificate (a throwaway self-signed one).
    let mut vulnerabilities = 0;
    for f in findings {
        let (id, severity) = (field(f, "id"), field(f, "severity"));
        let certificate =
            id.starts_with("cert") || id.starts_with("DNS_CAA") || id.starts_with("OCSP");
        if matches!(severity.as_str(), "MEDIUM" | "HIGH" | "CRITICAL") && !certificate {
            problems.push(format!("{id} {severity}: {}", field(f, "finding")));
        }
        if VULNERABILITY_CHECKS.contains(&id.as_str()) {
            vulnerabilities += 1;
        }
    }
    if vulnerabilities < 10 {
        problems.push(format!(
            "only {vulnerabilities} vulnerability checks reported: the scan did not run them"
        ));
    }
    let summary = format!(
        "TLS 1.2 and 1.3 only; {} suites, all AEAD, in the server's order; {vulnerabilities} vulnerability checks, none vulnerable",
        ciphers.len()
    );
    (problems, summary)
}

/// GET `path` from the admin server at `addr`; the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, body) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path} from {addr}: {head}");
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &str, severity: &str, finding: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "severity": severity, "finding": finding})
    }

    #[test]
    fn findings_are_judged_on_protocols_suites_and_vulnerabilities() {
        let mut good: Vec<serde_json::Value> = [
            ("SSLv2", "OK", "not offered"),
            ("SSLv3", "OK", "not offered"),
            ("TLS1", "INFO", "not offered"),
            ("TLS1_1", "INFO", "not offered"),
            ("TLS1_2", "OK", "offered"),
            ("TLS1_3", "OK", "offered with final"),
            ("cipher_x1301", "INFO", "x1301 TLS_AES_128_GCM_SHA256"),
            ("cert_chain_of_trust", "CRITICAL", "failed (self signed)."),
            ("cipher_order", "OK", "server"),
        ]
        .iter()
        .map(|(i, s, f)| finding(i, s, f))
        .collect();
        // Ten of them: enough to count as a scan that ran its vulnerability checks.
        for id in &VULNERABILITY_CHECKS[..10] {
            good.push(finding(id, "OK", "not vulnerable"));
        }
        assert_eq!(judge_findings(&good).0, Vec::<String>::new());
        let mut tls10 = good.clone();
        tls10[2] = finding("TLS1", "LOW", "offered (deprecated)");
        assert_eq!(judge_findings(&tls10).0.len(), 1);
        let mut cbc = good.clone();
        cbc.push(finding(
            "cipher_xc009",
            "INFO",
            "xc009 ECDHE-ECDSA-AES128-SHA",
        ));
        assert_eq!(judge_findings(&cbc).0.len(), 1);
        let mut vulnerable = good.clone();
        vulnerable.push(finding("BEAST", "MEDIUM", "VULNERABLE"));
        assert_eq!(judge_findings(&vulnerable).0.len(), 1);
        assert_eq!(
            judge_findings(&good[..9]).0.len(),
            1,
            "no vulnerability checks ran"
        );
        let mut client_order = good.clone();
        client_order[8] = finding("cipher_order", "HIGH", "NOT a cipher order configured");
        // Not the server's order, and rated HIGH.
        assert_eq!(judge_findings(&client_order).0.len(), 2);
    }
}
