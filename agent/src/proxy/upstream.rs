//! The upstream leg's first steps: connecting (TCP, or a local upstream's unix socket) within
//! the listener's connect timeout, and the PROXY protocol header that tells the upstream who the
//! client is.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use crate::config::ListenerConfig;
use crate::net::{StreamSocket, Upstream};
use crate::outcome::{Failure, Reason};
use crate::proxy_protocol::ClientTls;

/// Where a listener's upstream is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A local upstream's unix socket.
    Unix(std::path::PathBuf),
}

impl Target {
    /// The upstream a TLS-mode listener names (`upstream`, else `upstream_unix`).
    pub(crate) fn of(cfg: &ListenerConfig) -> Option<Self> {
        match (cfg.upstream, &cfg.upstream_unix) {
            (Some(addr), _) => Some(Target::Tcp(addr)),
            (None, Some(path)) => Some(Target::Unix(path.clone())),
            (None, None) => None,
        }
    }

    /// Connects within `deadline`.
    pub(crate) async fn connect(&self, deadline: Duration) -> Result<Upstream, Failure> {
        match self {
            Target::Tcp(addr) => connect_tcp(*addr, deadline).await.map(Upstream::Tcp),
            Target::Unix(path) => connect_unix(path, deadline).await.map(Upstream::Unix),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Connects to a TCP upstream within `deadline`.
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    deadline: Duration,
) -> Result<TcpStream, Failure> {
    match tokio::time::timeout(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // As on the client leg: no Nagle delay on relayed messages.
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(upstream = %addr, error = %e, "TCP_NODELAY");
            }
            Ok(s)
        }
        Ok(Err(e)) => Err(Failure::new(
            Reason::UpstreamUnreachable,
            format!("connect {addr}: {e}"),
        )),
        Err(_) => Err(Failure::new(
            Reason::UpstreamConnectTimeout,
            format!(
                "connect {addr}: no answer within {} ms",
                deadline.as_millis()
            ),
        )),
    }
}

/// Connects to a local upstream's unix socket within `deadline`.
async fn connect_unix(path: &Path, deadline: Duration) -> Result<UnixStream, Failure> {
    match tokio::time::timeout(deadline, UnixStream::connect(path)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Failure::new(
            Reason::UpstreamUnreachable,
            format!("connect {}: {e}", path.display()),
        )),
        Err(_) => Err(Failure::new(
            Reason::UpstreamConnectTimeout,
            format!(
                "connect {}: no answer within {} ms",
                path.display(),
                deadline.as_millis()
            ),
        )),
    }
}

/// Writes the listener's PROXY protocol header, when it asks for one, as the first bytes on the
/// upstream connection. `client` is the accepted socket (its local address is the header's
/// destination), `peer` the client's address, `tls` what the upstream learns of the client's
/// TLS session (v2).
pub(crate) async fn write_proxy_header(
    upstream: &impl StreamSocket,
    cfg: &ListenerConfig,
    client: &TcpStream,
    peer: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<(), Failure> {
    let Some(version) = cfg.proxy_protocol else {
        return Ok(());
    };
    let failed = |detail: String| Failure::new(Reason::ProxyHeaderFailed, detail);
    let local = client
        .local_addr()
        .map_err(|e| failed(format!("getsockname: {e}")))?;
    let header = crate::proxy_protocol::header(version, peer, local, tls)
        .map_err(|e| failed(format!("building the header: {e}")))?;
    crate::net::write_all(upstream, &header)
        .await
        .map_err(|e| failed(format!("writing to the upstream: {e}")))
}
