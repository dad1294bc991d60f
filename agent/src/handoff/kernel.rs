//! Moving a finished rustls session into the kernel: extract the traffic secrets, attach the
//! TLS ULP, install both directions' keys, and keep what the session still needs there
//! ([`KernelSession`]: rustls' key schedule for KeyUpdate and its ticket store).

use std::fmt;
use std::os::fd::BorrowedFd;

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

use super::{Schedule, TlsSession};
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
        let (secrets, conn, caught) = match self {
            TlsSession::Client(c, caught) => {
                let (secrets, k) = c.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Client(k), caught)
            }
            TlsSession::Server(s, caught) => {
                let (secrets, k) = s.dangerous_into_kernel_connection().map_err(extract)?;
                (secrets, KernelConn::Server(k), caught)
            }
        };
        let protocol = conn
            .protocol_version()
            .unwrap_or(ProtocolVersion::Unknown(0));
        let is_client = matches!(conn, KernelConn::Client(_));
        // The agent's copy of the schedule, checked against the keys rustls hands over: a
        // copy that disagrees is dropped (the connection then cannot rekey after a move).
        let schedule = match protocol {
            ProtocolVersion::TLSv1_3 => Cipher::from_suite(conn.suite())
                .and_then(|cipher| Schedule::from_caught(caught, is_client, cipher))
                .filter(|s| {
                    let agree = agrees(s, &secrets);
                    if !agree {
                        tracing::warn!(%peer, "the key schedule caught from the handshake does not give rustls' keys: dropped (this connection cannot rekey after a takeover)");
                    }
                    agree
                })
                .map(Box::new),
            _ => None,
        };
        let session = install(protocol, secrets, sock, peer)?;
        Ok(KernelSession {
            conn,
            session,
            tickets: 0,
            schedule,
        })
    }
}

/// rustls' half of a session whose record layer is in the kernel.
enum KernelConn {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
    /// A session taken over from the agent before this one ([`crate::takeover`]): the kernel
    /// holds its record layer, and rustls' key schedule stayed behind.
    Moved {
        client: bool,
        confidentiality_limit: u64,
    },
}

impl KernelConn {
    fn protocol_version(&self) -> Option<ProtocolVersion> {
        match self {
            KernelConn::Client(k) => Some(k.protocol_version()),
            KernelConn::Server(k) => Some(k.protocol_version()),
            KernelConn::Moved { .. } => None,
        }
    }

    fn suite(&self) -> rustls::CipherSuite {
        match self {
            KernelConn::Client(k) => k.negotiated_cipher_suite().suite(),
            KernelConn::Server(k) => k.negotiated_cipher_suite().suite(),
            KernelConn::Moved { .. } => rustls::CipherSuite::Unknown(0),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            KernelConn::Client(k) => k.negotiated_cipher_suite(),
            KernelConn::Server(k) => k.negotiated_cipher_suite(),
            KernelConn::Moved {
                confidentiality_limit,
                ..
            } => return *confidentiality_limit,
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
            (KernelConn::Moved { .. }, _) => Err(rustls::Error::General(
                "the key schedule stayed with the agent this connection moved from".into(),
            )),
        }
    }
}

/// A TLS session under kTLS, with what is needed to keep it going: rustls' key schedule for
/// KeyUpdate and its session-ticket store.
pub struct KernelSession {
    conn: KernelConn,
    session: KtlsSession,
    /// NewSessionTickets from the server stored for resumption (client side only).
    pub tickets: u32,
    /// The agent's own copy of the TLS 1.3 key schedule, kept beside rustls' so that it can
    /// travel to a new agent at a takeover; `None` for TLS 1.2. Boxed: every kTLS leg holds
    /// this value, parked ones too.
    schedule: Option<Box<Schedule>>,
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

    /// A session whose socket a running agent handed over ([`crate::takeover`]): the kernel
    /// goes on with its records; the agent cannot derive its next keys (a KeyUpdate ends it
    /// cleanly) and takes no more tickets from it.
    pub fn moved(
        session: KtlsSession,
        is_client: bool,
        confidentiality_limit: u64,
        tickets: u32,
        schedule: Option<Schedule>,
    ) -> Self {
        Self {
            conn: KernelConn::Moved {
                client: is_client,
                confidentiality_limit,
            },
            session,
            tickets,
            schedule: schedule.map(Box::new),
        }
    }

    /// The session's TLS 1.3 key schedule, to travel with it at a takeover.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_deref()
    }

    /// Whether the agent is the TLS client on this leg (the upstream's leg of reencrypt and
    /// originate), not the server.
    pub fn is_client(&self) -> bool {
        matches!(
            self.conn,
            KernelConn::Client(_) | KernelConn::Moved { client: true, .. }
        )
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
        let info = match (&self.conn, &mut self.schedule) {
            // Taken over: the agent's own copy of the schedule is the only one.
            (KernelConn::Moved { .. }, Some(schedule)) => {
                let (key, iv) = schedule.next(direction).map_err(|why| SessionError::Tls {
                    what: "deriving the next traffic key",
                    source: rustls::Error::General(why),
                })?;
                let KtlsSession { version, cipher } = self.session;
                CryptoInfo::from_parts(version, cipher, 0, key.as_ref(), iv.as_ref())?
            }
            (_, schedule) => {
                let (seq, secrets) =
                    self.conn
                        .update_secret(direction)
                        .map_err(|source| SessionError::Tls {
                            what: "deriving the next traffic key",
                            source,
                        })?;
                // The agent's copy follows rustls' step for step; one that cannot is dropped
                // (the connection then cannot rekey after a move, and says so if it moves).
                if let Some(s) = schedule
                    && let Err(why) = s.next(direction)
                {
                    tracing::warn!(error = %why, "the agent's copy of a key schedule fell out of step: dropped");
                    *schedule = None;
                }
                CryptoInfo::from_rustls(self.session.version, seq, &secrets)?
            }
        };
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
                self.tickets = self.tickets.saturating_add(1);
                Ok(())
            }
            // Nowhere to store it: the session's ticket store stayed with the agent before.
            KernelConn::Moved { client: true, .. } => Ok(()),
            KernelConn::Server(_) | KernelConn::Moved { .. } => Err(SessionError::Tls {
                what: "a client sent a NewSessionTicket",
                source: rustls::Error::General("only servers send session tickets".into()),
            }),
        }
    }
}

/// Whether `schedule` derives the very keys rustls extracted, each direction.
fn agrees(schedule: &Schedule, secrets: &rustls::ExtractedSecrets) -> bool {
    use rustls::ConnectionTrafficSecrets as S;
    [
        (Direction::Tx, &secrets.tx.1),
        (Direction::Rx, &secrets.rx.1),
    ]
    .into_iter()
    .all(|(direction, extracted)| {
        let (key, iv) = match extracted {
            S::Aes128Gcm { key, iv }
            | S::Aes256Gcm { key, iv }
            | S::Chacha20Poly1305 { key, iv } => (key.as_ref(), iv.as_ref()),
            _ => return false,
        };
        schedule
            .current(direction)
            .is_ok_and(|(k, i)| k.as_ref() == key && i.as_ref() == iv)
    })
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
