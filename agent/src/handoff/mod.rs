//! A connection's TLS sessions: the handshake, run without reading past it ([`handshake`]), and
//! the handoff of a finished session to the kernel ([`kernel`]).

mod handshake;
mod kernel;

pub use handshake::{HandshakeError, KernelBound, LegSide, RecordBoundary, TlsLeg, flush_tls};
pub use kernel::{HandoffError, KernelSession, KtlsSession, SessionError};
