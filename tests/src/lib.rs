//! Shared pieces of the tlsplice integration tests: a throwaway PKI, rustls configurations pinned
//! to one cipher suite, a deterministic data pattern, and the kernel-requirement gate that makes
//! a test skip visibly (or fail, inside the VM matrix) when the kernel lacks what it needs.

pub mod ops;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};
use tlsplice::ktls::{Cipher, TlsVersion};

pub mod ktls_stream;

/// Environment variable the VM matrix sets in guests whose kernel must have what tests need:
/// there, a missing feature is a failure, not a skip.
pub const REQUIRE_ENV: &str = "TLSPLICE_REQUIRE_KERNEL_FEATURES";

/// Prefix of the line a skipped test prints; `cargo xtask test` collects these lines.
pub const SKIP_MARKER: &str = "TLSPLICE-SKIP";

/// Returns `true` when the test may go on. When `unavailable` holds a reason, prints a
/// `TLSPLICE-SKIP <test>: <reason>` line and returns `false`, or panics when the VM matrix said
/// the feature must be present.
pub fn require(test: &str, unavailable: Option<String>) -> bool {
    match unavailable {
        None => true,
        Some(reason) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("{test}: required kernel feature missing: {reason}")
        }
        Some(reason) => {
            println!("{SKIP_MARKER} {test}: {reason}");
            false
        }
    }
}

/// A rustls client session for "localhost" to `addr` (the agent, or a tap in front of it); the
/// handshake runs on first use.
pub fn tls_client(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let sock = std::net::TcpStream::connect(addr).expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config, name).expect("client");
    rustls::StreamOwned::new(conn, sock)
}

/// A loopback TCP port that was free a moment ago, for configurations that name their port.
/// It is taken below the kernel's ephemeral range (ip_local_port_range), so no outgoing
/// connection's automatic port can land on it between now and the agent's bind; successive
/// calls in a process walk through the range, so they do not hand out the same port twice.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let base = 10_000u32;
    let span = ephemeral_low.saturating_sub(base).max(1_000);
    // Different test processes start at different places in the range.
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(base + offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A loopback TCP server that runs `handle` on its own thread for every connection; returns
/// its address. The tests' upstreams are these.
pub fn serve(
    handle: impl Fn(std::net::TcpStream) + Send + Sync + Clone + 'static,
) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || handle(sock));
        }
    });
    addr
}

/// Why the agent cannot pin its BPF objects here, when it cannot.
pub fn bpffs_missing() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    (!mounted).then(|| "no bpf filesystem at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)".into())
}

/// `true` when the agent can pin here; otherwise prints why `test` skips (a failure in guests,
/// which mount bpffs).
pub fn bpffs_or_skip(test: &str) -> bool {
    match bpffs_missing() {
        None => true,
        Some(why) => {
            assert!(!in_guest(), "{why}");
            skip(test, &why);
            false
        }
    }
}

/// Sum of the samples of `family` (with `with` in their labels) in a /metrics text.
pub fn metric(text: &str, family: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits up to `limit` for `ok`, polling.
pub fn eventually(limit: std::time::Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Prints why `test` does not run here, in the line `cargo xtask test` counts as a skip.
pub fn skip(test: &str, why: &str) {
    println!("{SKIP_MARKER} {test}: {why}");
}

/// True inside a VM of the kernel matrix (which requires kernel features), false on the host.
pub fn in_guest() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some()
}

/// Starts `openssl s_client` against `agent`, asking for and verifying "localhost" against the
/// test CA in `pki_dir`, with `extra` arguments (e.g. `-quiet`, `-cert`); stdio is piped.
pub fn s_client(
    openssl: &std::path::Path,
    agent: std::net::SocketAddr,
    pki_dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(openssl)
        .args([
            "s_client",
            "-verify_return_error",
            "-servername",
            "localhost",
        ])
        .arg("-connect")
        .arg(agent.to_string())
        .arg("-CAfile")
        .arg(pki_dir.join("ca.pem"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start openssl s_client")
}

/// The tlsplice binary: `$TLSPLICE_AGENT_BIN` (the matrix sets it on the host), else
/// /usr/bin/tlsplice (where the VM images put it).
pub fn agent_binary() -> std::path::PathBuf {
    std::env::var_os("TLSPLICE_AGENT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/tlsplice".into())
}

/// The host program `name` (from /usr/bin or /usr/local/bin), or `None` after printing the
/// skip line for `test` (a failure inside the VM matrix, which copies these tools in).
pub fn tool_or_skip(test: &str, name: &str) -> Option<std::path::PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        require(test, Some(format!("{name} is not installed")));
    }
    found
}

/// A CA and a server certificate for "localhost" signed by it (ECDSA P-256).
pub struct TestPki {
    /// The CA certificate, for client trust stores.
    pub ca: CertificateDer<'static>,
    /// The server's certificate.
    pub server_cert: CertificateDer<'static>,
    /// The server's private key, PKCS#8 DER.
    pub server_key: Vec<u8>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server's certificate, PEM.
    pub server_cert_pem: String,
    /// The server's private key, PEM.
    pub server_key_pem: String,
    /// A client certificate from the same CA: CN [`CLIENT_CN`], SANs [`CLIENT_SANS`].
    pub client_cert: CertificateDer<'static>,
    /// The client's private key, PKCS#8 DER.
    pub client_key: Vec<u8>,
    /// The client certificate, PEM.
    pub client_cert_pem: String,
    /// The client's private key, PEM.
    pub client_key_pem: String,
    /// The CA, to issue more certificates ([`TestPki::issue_client`]).
    issuer: Arc<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>>,
}

/// Common name of [`TestPki`]'s client certificate.
pub const CLIENT_CN: &str = "client-1";
/// Subject alternative names of [`TestPki`]'s client certificate, as the agent reports them.
pub const CLIENT_SANS: [&str; 2] = [
    "DNS:client-1.internal",
    "URI:spiffe://tlsplice.test/ns/default/sa/client-1",
];

impl TestPki {
    /// Generates a fresh PKI whose server certificate is for "localhost".
    pub fn generate() -> Self {
        Self::generate_for(&["localhost"])
    }

    /// Generates a fresh PKI whose server certificate carries `names`.
    pub fn generate_for(names: &[&str]) -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tlsplice test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA cert");
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let server_cert = rcgen::CertificateParams::new(names)
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("server cert");
        let client_key = rcgen::KeyPair::generate().expect("client key");
        let mut client_params = rcgen::CertificateParams::new(vec!["client-1.internal".to_owned()])
            .expect("client params");
        client_params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://tlsplice.test/ns/default/sa/client-1")
                .expect("URI SAN"),
        ));
        client_params.distinguished_name = rcgen::DistinguishedName::new();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CLIENT_CN);
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params
            .signed_by(&client_key, &ca)
            .expect("client cert");
        Self {
            ca: ca.der().clone(),
            server_cert: server_cert.der().clone(),
            server_key: server_key.serialize_der(),
            ca_pem: ca.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert: client_cert.der().clone(),
            client_key: client_key.serialize_der(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            issuer: Arc::new(ca),
        }
    }

    /// A client certificate from this CA with common name `cn` and SANs `sans`
    /// (`spiffe://...` URIs, anything else a DNS name), and a client configuration that
    /// presents it and trusts the CA; also its PEM certificate and key.
    pub fn issue_client(&self, cn: &str, sans: &[&str]) -> (Arc<ClientConfig>, String, String) {
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.issue_client_serial(cn, sans, serial)
    }

    /// [`TestPki::issue_client`] with the certificate's serial number given.
    pub fn issue_client_serial(
        &self,
        cn: &str,
        sans: &[&str],
        serial: u64,
    ) -> (Arc<ClientConfig>, String, String) {
        let key = rcgen::KeyPair::generate().expect("client key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        for san in sans {
            let san = if san.starts_with("spiffe://") {
                rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*san).expect("URI SAN"))
            } else {
                rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*san).expect("DNS SAN"))
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &*self.issuer).expect("client cert");
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA into root store");
        let config = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("client certificate");
        (Arc::new(config), cert.pem(), key.serialize_pem())
    }

    /// A CRL from this CA (PEM) revoking the certificates with these serial numbers; `number`
    /// is its CRL number (a newer CRL has a higher one).
    pub fn crl(&self, number: u64, revoked: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2026, 1, 1),
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2026, 6, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .expect("CRL")
            .pem()
            .expect("CRL PEM")
    }

    /// Writes ca.pem, ca.key, server.pem, server.key, client.pem and client.key into a new directory
    /// and returns it.
    pub fn write_files(&self) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tlsplice-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create PKI dir");
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).expect("write ca.pem");
        std::fs::write(dir.join("server.pem"), &self.server_cert_pem).expect("write server.pem");
        std::fs::write(dir.join("server.key"), &self.server_key_pem).expect("write server.key");
        std::fs::write(dir.join("client.pem"), &self.client_cert_pem).expect("write client.pem");
        std::fs::write(dir.join("client.key"), &self.client_key_pem).expect("write client.key");
        std::fs::write(dir.join("ca.key"), self.issuer.key().serialize_pem())
            .expect("write ca.key");
        dir
    }

    /// A server configuration for the "localhost" certificate, default suites and versions.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_no_client_auth()
                .with_single_cert(
                    vec![self.server_cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone())),
                )
                .expect("server certificate"),
        )
    }

    /// A client configuration trusting this CA, with rustls' default suites and versions.
    /// A real ClientHello for "localhost" from a client of this PKI, as bytes (what
    /// passthrough routes on).
    pub fn client_hello(&self) -> Vec<u8> {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut conn = rustls::ClientConnection::new(self.client_config(), name).expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("hello");
        hello
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA into root store");
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// Like [`TestPki::client_config`], presenting the client certificate, offering `alpn`.
    pub fn client_config_with_cert(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA into root store");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![self.client_cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.client_key.clone())),
                )
                .expect("client certificate");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

/// A cipher suite under test, with the protocol version it implies.
#[derive(Debug, Clone, Copy)]
pub struct SuiteUnderTest {
    /// The rustls suite.
    pub suite: SupportedCipherSuite,
    /// Human name used in test output.
    pub name: &'static str,
    /// The version the kernel must be given.
    pub version: TlsVersion,
    /// The cipher the kernel must be given.
    pub cipher: Cipher,
}

impl SuiteUnderTest {
    /// TLS 1.3 with AES-128-GCM.
    pub fn tls13_aes128gcm() -> Self {
        Self {
            suite: aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            name: "TLS1.3 AES-128-GCM",
            version: TlsVersion::Tls13,
            cipher: Cipher::Aes128Gcm,
        }
    }
    /// TLS 1.3 with AES-256-GCM.
    pub fn tls13_aes256gcm() -> Self {
        Self {
            suite: aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            name: "TLS1.3 AES-256-GCM",
            version: TlsVersion::Tls13,
            cipher: Cipher::Aes256Gcm,
        }
    }
    /// TLS 1.3 with ChaCha20-Poly1305.
    pub fn tls13_chacha20() -> Self {
        Self {
            suite: aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            name: "TLS1.3 CHACHA20-POLY1305",
            version: TlsVersion::Tls13,
            cipher: Cipher::Chacha20Poly1305,
        }
    }
    /// TLS 1.2 ECDHE-ECDSA with AES-128-GCM.
    pub fn tls12_ecdhe_aes128gcm() -> Self {
        Self {
            suite: aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            name: "TLS1.2 ECDHE-ECDSA-AES128-GCM",
            version: TlsVersion::Tls12,
            cipher: Cipher::Aes128Gcm,
        }
    }

    fn provider(&self) -> Arc<CryptoProvider> {
        Arc::new(CryptoProvider {
            cipher_suites: vec![self.suite],
            ..aws_lc_rs::default_provider()
        })
    }

    /// A server configuration that can only negotiate this suite.
    pub fn server_config(&self, pki: &TestPki) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(self.provider())
            .with_protocol_versions(&[self.suite.version()])
            .expect("protocol version")
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone())),
            )
            .expect("server certificate");
        config.enable_secret_extraction = true;
        Arc::new(config)
    }

    /// A client configuration that trusts the test CA and can only negotiate this suite.
    pub fn client_config(&self, pki: &TestPki) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).expect("CA into root store");
        let mut config = ClientConfig::builder_with_provider(self.provider())
            .with_protocol_versions(&[self.suite.version()])
            .expect("protocol version")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        Arc::new(config)
    }
}

/// A deterministic byte stream (xorshift64), so each side can check what it received without
/// keeping a copy of what was sent.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    /// A stream for `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 * 1024;

/// Writes `len` bytes of `Pattern::new(seed)` to `w`.
pub fn send_pattern(w: &mut (impl Write + ?Sized), seed: u64, len: usize) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK);
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    w.flush()
}

/// Reads exactly `len` bytes from `r` and checks they are `Pattern::new(seed)`; returns the
/// offset of the first differing 64 KiB chunk as an error.
pub fn expect_pattern(r: &mut (impl Read + ?Sized), seed: u64, len: usize) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CHUNK);
        pattern.fill(&mut want[..n]);
        r.read_exact(&mut got[..n])?;
        if want[..n] != got[..n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("received bytes differ from what was sent in the chunk at offset {offset}"),
            ));
        }
        offset += n;
    }
    Ok(())
}

/// A TCP forwarder that records every byte it forwards: a wire capture of one leg, used to
/// prove what crosses it (ciphertext only on an encrypted leg).
pub struct Tap {
    /// Where clients connect instead of the target.
    pub addr: std::net::SocketAddr,
    handle: std::thread::JoinHandle<io::Result<(Vec<u8>, Vec<u8>)>>,
}

impl Tap {
    /// Forwards the next connection to `target` and records it.
    pub fn start(target: std::net::SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tap");
        let addr = listener.local_addr().expect("tap addr");
        let handle = std::thread::spawn(move || {
            let (client, _) = listener.accept()?;
            let server = std::net::TcpStream::connect(target)?;
            let copy = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || -> io::Result<Vec<u8>> {
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                            Err(e) => return Err(e),
                        };
                        if n == 0 {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                            return Ok(seen);
                        }
                        seen.extend_from_slice(&buf[..n]);
                        to.write_all(&buf[..n])?;
                    }
                })
            };
            let up = copy(client.try_clone()?, server.try_clone()?);
            let down = copy(server, client);
            let up = up
                .join()
                .map_err(|_| io::Error::other("tap thread panicked"))??;
            let down = down
                .join()
                .map_err(|_| io::Error::other("tap thread panicked"))??;
            Ok((up, down))
        });
        Self { addr, handle }
    }

    /// Waits for the connection to end; returns (client-to-target, target-to-client) bytes.
    pub fn finish(self) -> (Vec<u8>, Vec<u8>) {
        self.handle
            .join()
            .expect("tap thread")
            .expect("tap forwarding")
    }
}

/// 32-byte samples of `Pattern::new(seed)` at several offsets within `len` bytes: if any of
/// them shows up in a capture, plaintext crossed that leg.
pub fn pattern_samples(seed: u64, len: usize) -> Vec<Vec<u8>> {
    let mut all = vec![0u8; len];
    Pattern::new(seed).fill(&mut all);
    [0, len / 3, len / 2, len.saturating_sub(64)]
        .iter()
        .map(|&o| all[o..(o + 32).min(len)].to_vec())
        .collect()
}

/// True when `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The agent, in-process: a tokio runtime serving one listener named "test", and the reports
/// of the connections it closed.
pub struct Agent {
    runtime: tokio::runtime::Runtime,
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    reports: tokio::sync::mpsc::UnboundedReceiver<tlsplice::outcome::ConnectionReport>,
}

/// A listener named "test" for `mode` on an ephemeral port, using the PKI files in `pki_dir`
/// (see [`TestPki::write_files`]) for whichever legs the mode makes TLS.
pub fn listener(
    mode: tlsplice::config::Mode,
    pki_dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    data_path: tlsplice::config::DataPathPolicy,
) -> tlsplice::config::ListenerConfig {
    let client_tls = mode.client_tls();
    tlsplice::config::ListenerConfig {
        name: "test".into(),
        mode,
        listen: "127.0.0.1:0".parse().expect("addr"),
        upstream: Some(upstream),
        upstream_unix: None,
        sni: Default::default(),
        cert: client_tls.then(|| pki_dir.join("server.pem")),
        key: client_tls.then(|| pki_dir.join("server.key")),
        client_ca: None,
        proxy_protocol: None,
        upstream_tls: mode.upstream_tls().then(|| tlsplice::config::UpstreamTls {
            server_name: "localhost".into(),
            ca: pki_dir.join("ca.pem"),
            client_cert: None,
            client_key: None,
            tls_versions: None,
            cipher_suites: None,
            groups: None,
            session_resumption: None,
            allow_servers: vec![],
            effective_tls: Default::default(),
        }),
        alpn: vec![],
        handshake_timeout_ms: 10_000,
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

impl Agent {
    /// Binds and starts serving `listener`.
    pub fn start(listener: tlsplice::config::ListenerConfig) -> Self {
        Self::start_with_limits(listener, tlsplice::config::LimitsConfig::default())
    }

    /// Binds and starts serving `listener` under the node limits `limits`.
    pub fn start_with_limits(
        listener: tlsplice::config::ListenerConfig,
        limits: tlsplice::config::LimitsConfig,
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut config = tlsplice::config::Config {
            listeners: vec![listener],
            ebpf: tlsplice::config::EbpfConfig::default(),
            admin: tlsplice::config::AdminConfig::default(),
            limits,
            certs: tlsplice::config::CertsConfig::default(),
            tls: Default::default(),
        };
        config.resolve_tls();
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let caps = Arc::new(tlsplice::path::KernelCaps::probe());
        let proxy = runtime
            .block_on(tlsplice::proxy::Proxy::bind(&config, caps, Some(tx)))
            .expect("bind");
        let addr = proxy.local_addr("test").expect("bound");
        runtime.spawn(proxy.run());
        Self {
            runtime,
            addr,
            reports,
        }
    }

    /// The report of the next connection to end (waits up to 120 s).
    pub fn next_report(&mut self) -> tlsplice::outcome::ConnectionReport {
        let reports = &mut self.reports;
        self.runtime
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(120), reports.recv()).await
            })
            .expect("a connection report within 120 s")
            .expect("report channel open")
    }
}

/// The data paths a terminate listener can be forced onto here: user space always, kTLS where
/// the kernel has it (in the matrix's guests it must; on a host without it, `test` prints why
/// it skips that path).
pub fn tls_data_paths(test: &str) -> Vec<tlsplice::outcome::DataPath> {
    let mut paths = vec![tlsplice::outcome::DataPath::Userspace];
    let ktls = tlsplice::probe::ktls_available()
        .err()
        .map(|e| e.to_string());
    if require(
        &format!("{test} (ktls path)"),
        ktls.map(|e| format!("no kTLS here: {e}")),
    ) {
        paths.push(tlsplice::outcome::DataPath::Ktls);
    }
    paths
}

/// The data path a connection must take on this kernel when the listener allows kTLS, and a
/// phrase its reason must contain when that is not kTLS.
pub fn expected_auto_path() -> (tlsplice::outcome::DataPath, Option<String>) {
    match tlsplice::probe::ktls_available() {
        Ok(()) => (tlsplice::outcome::DataPath::Ktls, None),
        Err(e) => {
            assert!(
                std::env::var_os(REQUIRE_ENV).is_none(),
                "this guest must have kTLS: {e}"
            );
            (
                tlsplice::outcome::DataPath::Userspace,
                Some("kernel has no kTLS".to_owned()),
            )
        }
    }
}

/// GET `path` from an HTTP server at `addr` (the agent's admin server): the status code and the
/// body. Connecting may take 2 s and the answer 10 s before it fails.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {text}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One of the agent's connected TCP sockets, as read through a duplicate of its descriptor.
#[derive(Debug)]
pub struct AgentSocket {
    /// Its local address.
    pub local: SocketAddr,
    /// The address it is connected to.
    pub peer: SocketAddr,
    /// Whether TCP_NODELAY is set (small writes go out at once, no Nagle delay).
    pub nodelay: bool,
}

/// A running `tlsplice run`, its stderr in a file.
pub struct AgentProcess {
    /// The process.
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// Its admin server.
    pub admin: SocketAddr,
    /// Its BPF pin directory.
    pub pin: PathBuf,
    /// Its configuration file (rewrite it and send SIGHUP to reload).
    pub config: PathBuf,
}

impl AgentProcess {
    /// Starts the agent (under `wrapper`, e.g. setpriv) and waits until its admin server
    /// listens, or until it exits.
    pub fn start(dir: &Path, config: &str, wrapper: &[&str], extra: &[&str]) -> Self {
        Self::start_pinned(dir, config, wrapper, extra, None)
    }

    /// As [`AgentProcess::start`], pinning under `pin` when given.
    pub fn start_pinned(
        dir: &Path,
        config: &str,
        wrapper: &[&str],
        extra: &[&str],
        pin: Option<&Path>,
    ) -> Self {
        Self::launch(dir, config, wrapper, extra, pin, &[], None)
    }

    /// As [`AgentProcess::start`] with no wrapper, and `env` set for the agent.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)], extra: &[&str]) -> Self {
        Self::launch(dir, config, &[], extra, None, env, None)
    }

    /// As [`AgentProcess::start`] with no wrapper, its admin server on `admin` (a new agent
    /// taking over another's admin socket).
    pub fn start_with_admin(dir: &Path, config: &str, admin: SocketAddr, extra: &[&str]) -> Self {
        Self::launch(dir, config, &[], extra, None, &[], Some(admin))
    }

    /// As [`AgentProcess::start_with_admin`], pinning under `pin`.
    pub fn start_pinned_with_admin(
        dir: &Path,
        config: &str,
        pin: &Path,
        admin: SocketAddr,
        extra: &[&str],
    ) -> Self {
        Self::launch(dir, config, &[], extra, Some(pin), &[], Some(admin))
    }

    /// The agent's connected TCP sockets (listeners and unix sockets left out), each
    /// duplicated into this process with pidfd_getfd(2) (Linux 5.6, needs ptrace rights over
    /// the agent: root) to read its options.
    pub fn connected_tcp_sockets(&self) -> Vec<AgentSocket> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let pid = self.child.id();
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
        // memory is passed.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(pidfd >= 0, "pidfd_open: {}", io::Error::last_os_error());
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        let mut sockets = Vec::new();
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the agent's fd dir");
        for entry in entries.flatten() {
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            let number = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok());
            let (true, Some(number)) = (is_socket, number) else {
                continue;
            };
            // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and
            // flags, and returns a new descriptor of ours or -1; no memory is passed.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), number, 0) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                // EBADF: closed since the directory was read. Anything else (EPERM) is a
                // harness problem, not an answer.
                assert_eq!(e.raw_os_error(), Some(libc::EBADF), "pidfd_getfd: {e}");
                continue;
            }
            // SAFETY: pidfd_getfd returned a new descriptor that nothing else owns.
            let sock = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            if sock.r#type().ok() != Some(socket2::Type::STREAM) {
                continue;
            }
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            if let (Some(local), Some(peer)) = (local, peer) {
                sockets.push(AgentSocket {
                    local,
                    peer,
                    nodelay: sock.tcp_nodelay().unwrap_or(false),
                });
            }
        }
        sockets
    }

    /// Every thread's effective, permitted and bounding capability sets (from
    /// /proc/PID/task/*/status), as bit masks.
    pub fn thread_capabilities(&self) -> Vec<(u64, u64, u64)> {
        let tasks = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(&tasks)
            .expect("task directory")
            .map(|t| {
                let status = std::fs::read_to_string(t.expect("task").path().join("status"))
                    .expect("status");
                let mask = |field: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(field))
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                        .unwrap_or_else(|| panic!("{field} in {status}"))
                };
                (mask("CapEff:"), mask("CapPrm:"), mask("CapBnd:"))
            })
            .collect()
    }

    /// Asserts every thread of the agent holds no capability outside `allowed` (bit numbers) in
    /// its effective, permitted and bounding sets, and that the log says which it kept.
    pub fn assert_capabilities_within(&self, allowed: &[u32]) {
        let mask: u64 = allowed.iter().map(|b| 1u64 << b).sum();
        let threads = self.thread_capabilities();
        assert!(threads.len() > 1, "the agent runs worker threads");
        for (eff, prm, bnd) in &threads {
            assert_eq!(eff & !mask, 0, "effective {eff:#x} beyond {mask:#x}");
            assert_eq!(prm & !mask, 0, "permitted {prm:#x} beyond {mask:#x}");
            assert_eq!(bnd & !mask, 0, "bounding {bnd:#x} beyond {mask:#x}");
        }
        assert!(
            self.log_text().contains("capabilities dropped after start"),
            "{}",
            self.log_text()
        );
    }

    /// Whether the agent process is still running.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts the agent with its admin server on `admin`, or on a free port.
    fn launch(
        dir: &Path,
        config: &str,
        wrapper: &[&str],
        extra: &[&str],
        pin: Option<&Path>,
        env: &[(&str, &str)],
        admin: Option<SocketAddr>,
    ) -> Self {
        let admin = admin.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin = pin.map_or_else(
            || {
                PathBuf::from(format!(
                    "/sys/fs/bpf/tlsplice-test-{}-{n}",
                    std::process::id()
                ))
            },
            Path::to_path_buf,
        );
        let path = dir.join(format!("agent-{n}.toml"));
        std::fs::write(&path, config).expect("write config");
        let log = dir.join(format!("agent-{n}.log"));
        let stderr = std::fs::File::create(&log).expect("log file");
        let bin = agent_binary();
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--bpf-pin-path")
            .arg(&pin)
            .args(extra)
            .env("TLSPLICE_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut agent = Self {
            child,
            log,
            admin,
            pin,
            config: path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.log_text().contains("admin server listening") {
            if let Ok(Some(status)) = agent.child.try_wait() {
                println!("agent exited with {status}");
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tlsplice stats --json` as (family, labels) -> value.
    pub fn stats(&self) -> BTreeMap<(String, BTreeMap<String, String>), u64> {
        let out = Command::new(agent_binary())
            .args(["stats", "--json", "--bpf-pin-path"])
            .arg(&self.pin)
            .output()
            .expect("tlsplice stats");
        assert!(
            out.status.success(),
            "tlsplice stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats json");
        let mut map = BTreeMap::new();
        for c in v["counters"].as_array().expect("counters") {
            let labels = c["labels"]
                .as_object()
                .expect("labels")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let name = c["name"].as_str().expect("name").to_owned();
            map.insert((name, labels), c["value"].as_u64().expect("value"));
        }
        map
    }

    /// GET /metrics from the admin server.
    pub fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200, "{text}");
        text
    }

    /// GET `path` from the admin server: the status code and the body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
            .unwrap_or_else(|e| panic!("GET {path} from the admin server: {e}"))
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid this test spawned and has not reaped.
        unsafe { libc::kill(pid, signal) };
    }

    /// SIGTERM, and the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let status = self.terminate();
        assert!(status.is_some(), "agent ignored SIGTERM");
        status.unwrap_or_default()
    }

    /// Up to `limit` for the agent to exit on its own (no signal), and its status.
    pub fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then up to 10 s for the agent to exit (and remove its pins).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // A failing test still stops the agent cleanly, so no pins stay behind.
        if self.terminate().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ip` with `args`, panicking with its output when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace the test made (`ip netns add`), deleted with its interfaces when
/// dropped.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// A fresh namespace named after `tag` and this process, with its loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("tlsplice-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// The wrapper that starts a program in it (for [`AgentProcess::start`]).
    pub fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }

    /// Runs `f` with the calling thread in this namespace (network namespaces are per
    /// thread), then puts the thread back.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let home = std::fs::File::open("/proc/thread-self/ns/net").expect("this thread's netns");
        let there = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("the netns");
        enter_netns(&there);
        let out = f();
        enter_netns(&home);
        out
    }
}

fn enter_netns(ns: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: setns(2) with an open namespace file; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Every frame crossing one interface, read with an AF_PACKET socket (what tcpdump sees) on
/// a thread of its own in the interface's namespace, until [`PacketCapture::finish`].
pub struct PacketCapture {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<u8>>,
}

impl PacketCapture {
    /// Starts capturing on `ifname` in `netns`; returns once the socket is bound.
    pub fn start(netns: &Netns, ifname: &str) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready, bound) = std::sync::mpsc::channel();
        let there = std::fs::File::open(format!("/run/netns/{}", netns.name)).expect("netns");
        let (ifname, flag) = (ifname.to_owned(), stop.clone());
        let handle = std::thread::spawn(move || {
            enter_netns(&there);
            let name = std::ffi::CString::new(ifname).expect("name");
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index > 0, "no such interface");
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
            assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            use std::os::fd::AsRawFd;
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = i32::try_from(index).expect("index");
            // SAFETY: `addr` is a valid sockaddr_ll and the length says so.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
            // Room for a burst: a capture socket that overflows drops frames, and the check
            // would see less than crossed the wire (SO_RCVBUFFORCE: root may pass rmem_max).
            let room: libc::c_int = 256 << 20;
            // SAFETY: SO_RCVBUFFORCE takes an int of the length given.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const room).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval of the length given.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            let _ = ready.send(());
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 65536 + 128];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && seen.len() < (512 << 20) {
                // SAFETY: `frame` is writable for its length.
                let n = unsafe {
                    libc::recv(sock.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0)
                };
                if let Ok(n) = usize::try_from(n) {
                    seen.extend_from_slice(&frame[..n]);
                }
            }
            // What is still queued crossed the wire before the stop: read it too.
            loop {
                // SAFETY: as above; MSG_DONTWAIT returns at once when nothing is queued.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                match usize::try_from(n) {
                    Ok(n) if n > 0 => seen.extend_from_slice(&frame[..n]),
                    _ => break,
                }
            }
            seen
        });
        bound
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture socket bound");
        Self { stop, handle }
    }

    /// Stops and returns every frame's bytes, one after another.
    pub fn finish(self) -> Vec<u8> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("capture thread")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trips_and_detects_corruption() {
        let mut wire = Vec::new();
        send_pattern(&mut wire, 7, 200_000).unwrap();
        assert_eq!(wire.len(), 200_000);
        expect_pattern(&mut wire.as_slice(), 7, 200_000).unwrap();
        assert!(expect_pattern(&mut wire.as_slice(), 8, 200_000).is_err());
        wire[150_000] ^= 1;
        let err = expect_pattern(&mut wire.as_slice(), 7, 200_000).unwrap_err();
        assert!(err.to_string().contains("offset 131072"), "{err}");
    }

    #[test]
    fn require_skips_with_marker_unless_required() {
        assert!(require("t", None));
        if std::env::var_os(REQUIRE_ENV).is_none() {
            assert!(!require("t", Some("because".into())));
        }
    }
}
