//! What the tests that run the agent binary share: an echo upstream, a test directory, TLS
//! clients (from a chosen source address, too) and a terminate listener's TOML.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::{AgentProcess, TestPki, serve};

/// An upstream that echoes every byte back until the client closes.
pub fn echo_upstream() -> SocketAddr {
    serve(|sock| {
        let _ = std::io::copy(&mut &sock, &mut &sock);
    })
}

/// A TLS upstream (the test PKI's "localhost") that echoes every byte back, and answers the
/// agent's close_notify with its own (without it, the agent reports the upstream's end as
/// `truncated`).
pub fn tls_echo_upstream(pki: &TestPki) -> SocketAddr {
    let config = pki.server_config();
    serve(move |sock| {
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = StreamOwned::new(conn, sock);
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = tls.read(&mut buf) {
            if n == 0 {
                tls.conn.send_close_notify();
                let _ = tls.flush();
                break;
            }
            if tls.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

/// A fresh directory for one test's files.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tlsplice-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test dir");
    dir
}

/// A client configuration trusting the CAs of `pkis`.
pub fn trusting(pkis: &[&TestPki]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for p in pkis {
        roots.add(p.ca.clone()).expect("CA");
    }
    Arc::new(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A client session through the agent.
pub type Client = StreamOwned<ClientConnection, TcpStream>;

/// A completed TLS session to `addr` for server name `sni`, or the handshake error.
pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>, sni: &str) -> Result<Client, String> {
    let sock = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let name = ServerName::try_from(sni.to_owned()).expect("name");
    let mut conn = ClientConnection::new(config, name).expect("client");
    let mut s = sock;
    while conn.is_handshaking() {
        conn.complete_io(&mut s).map_err(|e| e.to_string())?;
    }
    Ok(StreamOwned::new(conn, s))
}

/// Ends a session cleanly: close_notify, then the agent's close_notify and FIN.
pub fn finish(mut c: Client) {
    c.conn.send_close_notify();
    let _ = c.flush();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

/// One round trip through the echo upstream.
pub fn echo(c: &mut Client, payload: &[u8]) -> std::io::Result<()> {
    c.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back)?;
    if back != payload {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// A terminate listener's TOML.
pub fn terminate_listener(name: &str, port: u16, upstream: SocketAddr, pki: &Path) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:{port}\"\n\
         upstream = \"{upstream}\"\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout_ms = 5000\n",
        pki.join("server.pem").display(),
        pki.join("server.key").display()
    )
}

/// A TCP connection to `addr` from the local address `source` (any of 127.0.0.0/8 on
/// loopback), as a client on another host would make.
pub fn connect_from(source: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(source, 0).into())?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

/// A completed TLS session to `addr` from the local address `source`, or the handshake error.
pub fn connect_tls_from(
    source: IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<Client, String> {
    let sock = connect_from(source, addr).map_err(|e| format!("connect: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    tls_over(sock, config)
}

/// A TLS session for "localhost" over `sock`, its handshake completed, or the handshake error.
pub fn tls_over(mut sock: TcpStream, config: Arc<ClientConfig>) -> Result<Client, String> {
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
    }
    Ok(StreamOwned::new(conn, sock))
}

/// The agent's open descriptors, by what they are (socket, pipe, anon_inode, or a file's path).
pub fn descriptors(agent: &AgentProcess) -> Vec<String> {
    let dir = format!("/proc/{}/fd", agent.child.id());
    std::fs::read_dir(&dir)
        .expect("the agent's fd directory")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| {
            let t = t.to_string_lossy().into_owned();
            t.split(':').next().unwrap_or(&t).to_owned()
        })
        .collect()
}

/// The agent's descriptor count once it is steady ([`steady_descriptors_by_kind`]).
pub fn steady_descriptors(agent: &AgentProcess) -> usize {
    steady_descriptors_by_kind(agent).values().sum()
}

/// The agent's descriptors by kind once they are steady: a certificate check opens a file for a
/// moment, a `/metrics` request holds a socket until the agent has answered it, so two equal
/// readings in a row (at most 2 s of tries).
pub fn steady_descriptors_by_kind(agent: &AgentProcess) -> BTreeMap<String, usize> {
    let mut last = descriptors_by_kind(agent);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = descriptors_by_kind(agent);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// The agent's descriptors counted by kind (a file by its path).
pub fn descriptors_by_kind(agent: &AgentProcess) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for k in descriptors(agent) {
        *kinds.entry(k).or_default() += 1;
    }
    kinds
}
