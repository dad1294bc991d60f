//! A connection's TLS sessions: the handshake, run without reading past it ([`handshake`]),
//! then either the handoff of the session to the kernel ([`kernel`]) or its record layer in
//! user space ([`records`]).

mod handshake;
mod kernel;
mod records;
mod schedule;

pub use handshake::{HandshakeError, LegSide, RecordBoundary, TlsSession};
pub use kernel::{HandoffError, KernelSession, KtlsSession, SessionError};
pub use records::{Received, RecordError, UserSession};
pub use schedule::{Caught, Schedule, Secret, SecretCatcher};
