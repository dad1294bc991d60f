//! What a connection's end is made of: a typed [`Reason`], what was learned on the way
//! ([`Facts`]), and the [`ConnectionReport`] that the proxy's one record point builds from them
//! for the log line, the counters ([`crate::metrics`]) and in-process observers.
//!
//! [`Reason`] and [`DataPath`] are defined in `tlsplice-common`, next to the counter keys that
//! store them, so the agent and `tlsplice stats` read the same names and numbers.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;

pub use tlsplice_common::{DataPath, Reason};

/// Why a connection (or one of its handshakes) failed: a reason from a closed set, for labels,
/// and a detail for the log line (which listener, which peer and which call are known to the
/// record point and the log line; the detail says what failed).
#[derive(Debug)]
pub struct Failure {
    /// The counted reason.
    pub reason: Reason,
    /// What happened, for the log line.
    pub detail: String,
    /// The client socket, when it is still open and should be closed gently: a FIN, then what
    /// the client still sends read away for a moment, so it gets the alert or FIN rather than a
    /// reset.
    pub linger: Option<tokio::net::TcpStream>,
}

impl Failure {
    /// A failure for `reason`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            linger: None,
        }
    }

    /// The same failure, with the client socket to close gently.
    #[must_use]
    pub fn lingering(mut self, client: tokio::net::TcpStream) -> Self {
        self.linger = Some(client);
        self
    }

    /// A failure of an I/O call while bytes were moving, by what the kernel said: a peer that
    /// reset or left is [`Reason::PeerReset`], a record the kernel would not decrypt
    /// ([`Reason::RecordError`]) or would not take as too long ([`Reason::RecordOverflow`]),
    /// anything else [`Reason::RelayError`]. `what` names the call.
    pub fn io(what: &str, e: &io::Error) -> Self {
        let reason = match e.raw_os_error() {
            Some(libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN | libc::ECONNABORTED) => {
                Reason::PeerReset
            }
            // kTLS: a record that does not authenticate (EBADMSG) or is too long (EMSGSIZE).
            Some(libc::EBADMSG) => Reason::RecordError,
            Some(libc::EMSGSIZE) => Reason::RecordOverflow,
            _ => Reason::RelayError,
        };
        Self::new(reason, format!("{what}: {e}"))
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Self::io("relay", &e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

/// How one TLS handshake ended, as counted by [`crate::metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeOutcome {
    /// [`Reason::Ok`] when it completed, else why it failed.
    pub outcome: Reason,
    /// Negotiated protocol version, wire value (0 when it failed).
    pub version: u16,
    /// Negotiated cipher suite, IANA value (0 when it failed).
    pub suite: u16,
    /// Key exchange group, IANA value (0 when it failed, or not known: a TLS 1.2 resumption,
    /// a connection moved from an agent that did not send it).
    pub group: u16,
}

impl HandshakeOutcome {
    /// A completed handshake.
    pub fn completed(common: &rustls::CommonState) -> Self {
        Self {
            outcome: Reason::Ok,
            version: common.protocol_version().map_or(0, u16::from),
            suite: common
                .negotiated_cipher_suite()
                .map_or(0, |s| u16::from(s.suite())),
            group: common
                .negotiated_key_exchange_group()
                .map_or(0, |g| u16::from(g.name())),
        }
    }

    /// A failed handshake and the reason it is counted under.
    pub fn failed(reason: Reason) -> Self {
        Self {
            outcome: reason,
            version: 0,
            suite: 0,
            group: 0,
        }
    }

    /// The negotiated version and cipher as the kernel knows them (`TLSv1.3 AES-128-GCM`), else
    /// as rustls names them, then the key exchange group where it is known
    /// (`TLSv1.3 AES-128-GCM X25519MLKEM768`).
    pub fn session_text(&self) -> String {
        let version = rustls::ProtocolVersion::from(self.version);
        let suite = rustls::CipherSuite::from(self.suite);
        let mut text = match (
            crate::ktls::TlsVersion::from_rustls(version),
            crate::ktls::Cipher::from_suite(suite),
        ) {
            (Some(v), Some(c)) => format!("{v} {c}"),
            _ => format!("{version:?} {suite:?}"),
        };
        match (self.group, crate::config::GroupName::from_wire(self.group)) {
            (0, _) => {}
            (_, Some(g)) => text = format!("{text} {}", g.as_str()),
            (other, None) => text = format!("{text} group 0x{other:04x}"),
        }
        text
    }
}

/// What is known of a connection so far. The connection code fills it in as it goes; the
/// record point reads it once the connection has ended, however it ended.
#[derive(Debug, Default)]
pub struct Facts {
    /// The data path taken, once chosen.
    pub data_path: Option<DataPath>,
    /// Why that data path (fixed text where it can be: held as long as the connection).
    pub path_reason: Cow<'static, str>,
    /// What was negotiated: its text is made only for a log line or the report
    /// ([`Facts::session_text`]).
    pub session: Session,
    /// The verified client certificate's names (mTLS listeners).
    pub client_identity: Option<String>,
    /// The client leg's handshake, when the agent ran one.
    pub client_handshake: Option<HandshakeOutcome>,
    /// The upstream leg's handshake, when the agent ran one.
    pub upstream_handshake: Option<HandshakeOutcome>,
    /// Plaintext bytes from the client to the upstream.
    pub bytes_up: u64,
    /// Plaintext bytes from the upstream to the client.
    pub bytes_down: u64,
    /// TLS 1.3 key changes under kTLS, each direction counted once.
    pub key_updates: u64,
    /// Session tickets stored from a TLS upstream under kTLS.
    pub tickets: u64,
    /// When it was accepted (or adopted at a takeover), in [`agent_millis`]; 0: not known.
    pub accepted_ms: u32,
    /// Its place among the open connections, once its data path is chosen.
    pub active: Option<crate::metrics::ActiveConnection>,
}

/// Milliseconds since this agent first asked, never 0, wrapping after 49 days: a connection's
/// start in four bytes (every parked connection holds one).
pub fn agent_millis() -> u32 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let millis = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis();
    // Truncation is the wrap: durations are differences taken modulo 2^32 ms.
    #[allow(clippy::cast_possible_truncation)]
    let wrapped = millis as u32;
    wrapped.max(1)
}

/// What a connection negotiated, kept typed: every parked connection holds it, and its text is
/// needed only for a log line or the report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Session {
    /// Nothing negotiated (yet).
    #[default]
    None,
    /// The agent's TLS legs completed their handshakes (each leg's version and suite are in
    /// its [`HandshakeOutcome`]), with the protocol the client's leg agreed by ALPN.
    Tls {
        /// The ALPN protocol, if one was agreed.
        alpn: Option<Box<[u8]>>,
    },
    /// Passthrough: the server name in the ClientHello, if it had one.
    Sni(Option<Box<str>>),
    /// A connection taken over from the agent before this one: what that agent said it
    /// negotiated.
    Moved(Box<str>),
}

impl Facts {
    /// The negotiated versions, ciphers and ALPN (`client TLSv1.3 AES-128-GCM, upstream ...,
    /// ALPN h2`), or the passthrough server name (`SNI example.com`); empty before either.
    pub fn session_text(&self) -> String {
        match &self.session {
            Session::None => String::new(),
            Session::Moved(text) => text.to_string(),
            Session::Sni(name) => format!("SNI {}", name.as_deref().unwrap_or("(none)")),
            Session::Tls { alpn } => {
                let legs = [
                    ("client", &self.client_handshake),
                    ("upstream", &self.upstream_handshake),
                ];
                let mut parts: Vec<String> = legs
                    .into_iter()
                    .filter_map(|(leg, hs)| {
                        let hs = hs.as_ref().filter(|h| h.outcome == Reason::Ok)?;
                        Some(format!("{leg} {}", hs.session_text()))
                    })
                    .collect();
                if let Some(alpn) = alpn {
                    parts.push(format!("ALPN {}", String::from_utf8_lossy(alpn)));
                }
                parts.join(", ")
            }
        }
    }

    /// Records the data path and why.
    pub fn take_path(&mut self, path: DataPath, why: impl Into<Cow<'static, str>>) {
        if let Some(active) = &mut self.active {
            active.relabel(path);
        }
        self.data_path = Some(path);
        self.path_reason = why.into();
    }
}

/// The end of one connection, as logged, counted and (optionally) sent to an observer.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// Listener name.
    pub listener: String,
    /// Client address.
    pub peer: SocketAddr,
    /// [`Reason::Ok`] on a clean close, else why it failed.
    pub outcome: Reason,
    /// What failed, when it failed.
    pub error: Option<String>,
    /// The data path used, when the connection got that far.
    pub data_path: Option<DataPath>,
    /// Why that data path (empty when none was chosen).
    pub path_reason: String,
    /// Negotiated version and cipher, e.g. "client TLSv1.3 AES-128-GCM".
    pub session: String,
    /// The verified client certificate's names (mTLS listeners), e.g. "CN=a SAN=DNS:a".
    pub client_identity: Option<String>,
    /// Plaintext bytes from the client to the upstream.
    pub bytes_up: u64,
    /// Plaintext bytes from the upstream to the client.
    pub bytes_down: u64,
    /// TLS 1.3 key changes under kTLS: the peers' KeyUpdates followed and our own (on request
    /// or at the record limit), each direction counted once.
    pub key_updates: u64,
    /// Session tickets stored from a TLS upstream under kTLS, for resumption.
    pub tickets: u64,
    /// The client leg's TLS handshake, when the agent ran one.
    pub client_handshake: Option<HandshakeOutcome>,
    /// The upstream leg's TLS handshake, when the agent ran one.
    pub upstream_handshake: Option<HandshakeOutcome>,
    /// How long it lasted in this agent, in seconds, when its start is known.
    pub duration_seconds: Option<f64>,
}

impl ConnectionReport {
    /// The report of a connection of `listener` from `peer` that ended with `ended`.
    pub fn new(listener: &str, peer: SocketAddr, facts: Facts, ended: Result<(), Failure>) -> Self {
        let (outcome, error) = match ended {
            Ok(()) => (Reason::Ok, None),
            Err(f) => (f.reason, Some(f.detail)),
        };
        let session = facts.session_text();
        let duration_seconds = (facts.accepted_ms != 0)
            .then(|| f64::from(agent_millis().wrapping_sub(facts.accepted_ms)) / 1000.0);
        Self {
            duration_seconds,
            listener: listener.to_owned(),
            peer,
            outcome,
            error,
            data_path: facts.data_path,
            path_reason: facts.path_reason.into_owned(),
            session,
            client_identity: facts.client_identity,
            bytes_up: facts.bytes_up,
            bytes_down: facts.bytes_down,
            key_updates: facts.key_updates,
            tickets: facts.tickets,
            client_handshake: facts.client_handshake,
            upstream_handshake: facts.upstream_handshake,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_are_classified_by_what_the_kernel_said() {
        let cases = [
            (libc::ECONNRESET, Reason::PeerReset),
            (libc::EPIPE, Reason::PeerReset),
            (libc::EBADMSG, Reason::RecordError),
            (libc::EMSGSIZE, Reason::RecordOverflow),
            (libc::EIO, Reason::RelayError),
        ];
        for (errno, reason) in cases {
            let f = Failure::io("splice", &io::Error::from_raw_os_error(errno));
            assert_eq!(f.reason, reason, "{errno}");
            assert!(f.detail.starts_with("splice: "), "{}", f.detail);
        }
    }

    #[test]
    fn a_report_carries_the_facts_and_the_typed_outcome() {
        let mut facts = Facts::default();
        facts.take_path(DataPath::Splice, "why");
        facts.bytes_up = 5;
        let peer = "127.0.0.1:1".parse().expect("addr");
        let r = ConnectionReport::new(
            "web",
            peer,
            facts,
            Err(Failure::new(Reason::IdleTimeout, "idle")),
        );
        assert_eq!(r.outcome, Reason::IdleTimeout);
        assert_eq!(r.error.as_deref(), Some("idle"));
        assert_eq!(r.data_path, Some(DataPath::Splice));
        assert_eq!(r.bytes_up, 5);
        let ok = ConnectionReport::new("web", peer, Facts::default(), Ok(()));
        assert_eq!((ok.outcome, ok.error), (Reason::Ok, None));
    }

    #[test]
    fn the_session_text_is_made_from_the_typed_session_and_handshakes() {
        let done = |version: u16, suite: u16| {
            Some(HandshakeOutcome {
                outcome: Reason::Ok,
                version,
                suite,
                group: 0,
            })
        };
        let with_group = |group: u16| done(0x0304, 0x1302).map(|h| HandshakeOutcome { group, ..h });
        // TLS 1.3 AES-128-GCM (0x1301), TLS 1.2 ECDHE-ECDSA ChaCha20 (0xcca9), TLS 1.3
        // AES-128-CCM (0x1304: no kTLS code in the agent).
        let cases: [(
            Session,
            Option<HandshakeOutcome>,
            Option<HandshakeOutcome>,
            &str,
        ); 9] = [
            (Session::None, done(0x0304, 0x1301), None, ""),
            (
                Session::Tls { alpn: None },
                done(0x0304, 0x1301),
                done(0x0303, 0xcca9),
                "client TLSv1.3 AES-128-GCM, upstream TLSv1.2 CHACHA20-POLY1305",
            ),
            (
                Session::Tls {
                    alpn: Some(Box::from(&b"h2"[..])),
                },
                done(0x0304, 0x1301),
                None,
                "client TLSv1.3 AES-128-GCM, ALPN h2",
            ),
            (
                Session::Tls { alpn: None },
                None,
                done(0x0304, 0x1301),
                "upstream TLSv1.3 AES-128-GCM",
            ),
            (
                Session::Tls { alpn: None },
                done(0x0304, 0x1304),
                Some(HandshakeOutcome::failed(Reason::UpstreamHandshakeFailed)),
                "client TLSv1_3 TLS13_AES_128_CCM_SHA256",
            ),
            (
                Session::Sni(Some("b.test".into())),
                None,
                None,
                "SNI b.test",
            ),
            (Session::Sni(None), None, None, "SNI (none)"),
            (
                Session::Tls { alpn: None },
                with_group(0x11ec),
                with_group(0x001d),
                "client TLSv1.3 AES-256-GCM X25519MLKEM768, upstream TLSv1.3 AES-256-GCM X25519",
            ),
            (
                Session::Tls { alpn: None },
                with_group(0x0201),
                None,
                "client TLSv1.3 AES-256-GCM group 0x0201",
            ),
        ];
        for (session, client_handshake, upstream_handshake, want) in cases {
            let facts = Facts {
                session: session.clone(),
                client_handshake,
                upstream_handshake,
                ..Facts::default()
            };
            assert_eq!(facts.session_text(), want, "{session:?}");
        }
    }
}
