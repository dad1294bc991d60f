//! Moving a finished rustls session into the kernel: extract the traffic secrets, attach the
//! TLS ULP, install both directions' keys, and keep what the session still needs there
//! ([`KernelSession`]: rustls' key schedule for KeyUpdate and its ticket store).

use std::fmt;
use std::os::fd::BorrowedFd;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

use super::TlsSession;
use crate::ktls::{self, Cipher, CryptoInfo, Direction, KtlsError, TlsVersion};

/// Why a session could not be handed to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// rustls would not release the secrets.
    #[error("extracting TLS secrets for {peer}: {source}")]
    Extract {
        /// The remote address.
        peer: String,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The kernel refused the session.
    #[error("kTLS handoff for {peer}: {source}")]
    Kernel {
        /// The remote address.
        peer: String,
        /// The kernel interface error.
        source: KtlsError,
    },
}

impl TlsSession {
    /// Moves the session into the kernel: installs TX and RX state on `sock`, to which the
    /// caller has attached the TLS ULP ([`crate::ktls::attach_ulp`]) while it could still keep
    /// the session in user space if the kernel refused.
    /// The extracted secrets are zeroized before this returns; what rustls keeps can only derive
    /// the next keys (KeyUpdate) and take session tickets.
    pub fn into_kernel(
        self,
        sock: BorrowedFd<'_>,
        peer: &str,
    ) -> Result<KernelSession, HandoffError> {
        let extract = |source| HandoffError::Extract {
            peer: peer.to_owned(),
            source,
        };
        let (secrets, conn) = match self {
            TlsSession::Client(c) => {
                let (secrets, k) = c.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Client(k))
            }
            TlsSession::Server(s) => {
                let (secrets, k) = s.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Server(k))
            }
        };
        let session = install(conn.protocol_version(), secrets, sock, peer)?;
        Ok(KernelSession {
            conn,
            session,
            tickets: 0,
        })
    }
}

/// rustls' half of a session whose record layer is in the kernel.
enum KernelConn {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl KernelConn {
    fn protocol_version(&self) -> ProtocolVersion {
        match self {
            KernelConn::Client(k) => k.protocol_version(),
            KernelConn::Server(k) => k.protocol_version(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            KernelConn::Client(k) => k.negotiated_cipher_suite(),
            KernelConn::Server(k) => k.negotiated_cipher_suite(),
        };
        match suite {
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        }
    }

    fn update_secret(
        &mut self,
        direction: Direction,
    ) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match (self, direction) {
            (KernelConn::Client(k), Direction::Tx) => k.update_tx_secret(),
            (KernelConn::Client(k), Direction::Rx) => k.update_rx_secret(),
            (KernelConn::Server(k), Direction::Tx) => k.update_tx_secret(),
            (KernelConn::Server(k), Direction::Rx) => k.update_rx_secret(),
        }
    }
}

/// A TLS session under kTLS, with what is needed to keep it going: rustls' key schedule for
/// KeyUpdate and its session-ticket store.
pub struct KernelSession {
    conn: KernelConn,
    session: KtlsSession,
    /// NewSessionTickets from the server stored for resumption (client side only).
    pub tickets: u64,
}

impl fmt::Debug for KernelSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelSession")
            .field("session", &self.session)
            .field("tickets", &self.tickets)
            .finish_non_exhaustive()
    }
}

/// Why a session under kTLS could not follow a key change or keep a ticket.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// rustls refused (TLS 1.2 has no KeyUpdate; a malformed ticket).
    #[error("{what}: {source}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// The rustls error.
        source: rustls::Error,
    },
    /// The kernel refused the new key or the state query.
    #[error("{0}")]
    Kernel(#[from] KtlsError),
}

impl KernelSession {
    /// The version and cipher the kernel is running.
    pub fn session(&self) -> KtlsSession {
        self.session
    }

    /// Whether the agent is the TLS client on this leg (the upstream's leg of reencrypt and
    /// originate), not the server.
    pub fn is_client(&self) -> bool {
        matches!(self.conn, KernelConn::Client(_))
    }

    /// How many records may be sent under one key before the agent must rekey or close: the
    /// cipher suite's confidentiality limit as rustls states it.
    pub fn confidentiality_limit(&self) -> u64 {
        self.conn.confidentiality_limit()
    }

    /// Derives the next traffic key for `direction` (after a KeyUpdate: received for `Rx`, sent
    /// for `Tx`) and installs it in the kernel. The key is zeroized before this returns.
    pub fn rekey(
        &mut self,
        sock: BorrowedFd<'_>,
        direction: Direction,
    ) -> Result<(), SessionError> {
        let (seq, secrets) =
            self.conn
                .update_secret(direction)
                .map_err(|source| SessionError::Tls {
                    what: "deriving the next traffic key",
                    source,
                })?;
        let info = CryptoInfo::from_rustls(self.session.version, seq, &secrets)?;
        drop(secrets);
        ktls::set_crypto_info(sock, direction, &info)?;
        Ok(())
    }

    /// Stores the NewSessionTicket messages in a post-handshake record (`payload` is the
    /// handshake message without its 4-byte header) for resumption of the next connection.
    pub fn take_ticket(&mut self, payload: &[u8]) -> Result<(), SessionError> {
        match &mut self.conn {
            KernelConn::Client(k) => {
                k.handle_new_session_ticket(payload)
                    .map_err(|source| SessionError::Tls {
                        what: "storing a session ticket",
                        source,
                    })?;
                self.tickets += 1;
                Ok(())
            }
            KernelConn::Server(_) => Err(SessionError::Tls {
                what: "a client sent a NewSessionTicket",
                source: rustls::Error::General("only servers send session tickets".into()),
            }),
        }
    }
}

/// What the kernel took over for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KtlsSession {
    /// Negotiated protocol version.
    pub version: TlsVersion,
    /// Negotiated AEAD cipher.
    pub cipher: Cipher,
}

/// Installs both directions' keys from extracted secrets on a socket with the TLS ULP.
fn install(
    protocol: ProtocolVersion,
    secrets: rustls::ExtractedSecrets,
    sock: BorrowedFd<'_>,
    peer: &str,
) -> Result<KtlsSession, HandoffError> {
    let kernel = |source| HandoffError::Kernel {
        peer: peer.to_owned(),
        source,
    };
    let version = TlsVersion::from_rustls(protocol).ok_or_else(|| {
        kernel(KtlsError::Unsupported {
            what: format!("protocol version {protocol:?}"),
        })
    })?;
    let tx = CryptoInfo::from_rustls(version, secrets.tx.0, &secrets.tx.1).map_err(kernel)?;
    let rx = CryptoInfo::from_rustls(version, secrets.rx.0, &secrets.rx.1).map_err(kernel)?;
    // `secrets` holds rustls AeadKeys, which zeroize themselves on drop; `tx`/`rx` zeroize too.
    drop(secrets);
    ktls::set_crypto_info(sock, Direction::Tx, &tx).map_err(kernel)?;
    ktls::set_crypto_info(sock, Direction::Rx, &rx).map_err(kernel)?;
    Ok(KtlsSession {
        version,
        cipher: tx.cipher(),
    })
}
