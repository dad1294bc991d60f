//! Reading the server name (SNI) from a TLS ClientHello without consuming it, for passthrough
//! routing. The parser only looks; the bytes stay in the socket for the upstream to read.
//!
//! Layout (RFC 8446 4.1.2, RFC 6066 3): record header (type 22, version, length), handshake
//! header (type 1, 24-bit length), legacy_version, random, legacy_session_id, cipher_suites,
//! legacy_compression_methods, extensions; extension 0 is server_name.

/// The largest ClientHello record we wait for (a TLS record's plaintext limit plus header).
pub const MAX_CLIENT_HELLO: usize = 5 + 16 * 1024;

/// What a look at the first bytes of a connection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// More bytes are needed to decide.
    Incomplete,
    /// A ClientHello, with its server name if it carried one.
    ClientHello {
        /// The `host_name` of the server_name extension.
        server_name: Option<String>,
    },
}

/// Why the first bytes are not a usable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHelloError {
    /// The first byte is not a TLS handshake record.
    #[error("not TLS: first byte {0:#04x} is not a handshake record")]
    NotTls(u8),
    /// The first handshake message is not a ClientHello.
    #[error("first handshake message has type {0}, not ClientHello")]
    NotClientHello(u8),
    /// The record or message claims more than a ClientHello may be.
    #[error("ClientHello record of {0} bytes is larger than {MAX_CLIENT_HELLO}")]
    Oversized(usize),
    /// A length field points past the end of the message.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// A cursor over a byte slice that fails instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        if self.bytes.len() < n {
            return Err(ClientHelloError::Malformed(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<usize, ClientHelloError> {
        Ok(usize::from(self.take(1, what)?[0]))
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, ClientHelloError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u8(what)?;
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

/// Looks at the bytes a client sent first (a prefix of its stream).
pub fn peek(bytes: &[u8]) -> Result<Peek, ClientHelloError> {
    let Some(&first) = bytes.first() else {
        return Ok(Peek::Incomplete);
    };
    if first != 22 {
        return Err(ClientHelloError::NotTls(first));
    }
    if bytes.len() < 5 {
        return Ok(Peek::Incomplete);
    }
    if bytes[1] != 3 {
        return Err(ClientHelloError::NotTls(first));
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    if 5 + record_len > MAX_CLIENT_HELLO {
        return Err(ClientHelloError::Oversized(5 + record_len));
    }
    if bytes.len() < 5 + record_len {
        return Ok(Peek::Incomplete);
    }
    let mut r = Reader {
        bytes: &bytes[5..5 + record_len],
    };
    let msg_type = r.u8("handshake type")?;
    if msg_type != 1 {
        return Err(ClientHelloError::NotClientHello(bytes[5]));
    }
    let len = r.take(3, "handshake length")?;
    let msg_len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    if msg_len > record_len - 4 {
        // A ClientHello split over several records: legal but not something clients send
        // below 16 KiB; refusing is safer than guessing.
        return Err(ClientHelloError::Oversized(msg_len + 9));
    }
    let mut r = Reader {
        bytes: r.take(msg_len, "ClientHello body")?,
    };
    r.take(2 + 32, "version and random")?;
    r.vec8("session id")?;
    r.vec16("cipher suites")?;
    r.vec8("compression methods")?;
    if r.bytes.is_empty() {
        return Ok(Peek::ClientHello { server_name: None });
    }
    let mut exts = Reader {
        bytes: r.vec16("extensions")?,
    };
    while !exts.bytes.is_empty() {
        let ext_type = exts.u16("extension type")?;
        let body = exts.vec16("extension body")?;
        if ext_type != 0 {
            continue;
        }
        let mut list = Reader {
            bytes: Reader { bytes: body }.vec16("server name list")?,
        };
        while !list.bytes.is_empty() {
            let name_type = list.u8("server name type")?;
            let name = list.vec16("server name")?;
            if name_type == 0 {
                // RFC 6066 3: a HostName is 1 to 2^16-1 bytes of ASCII. An empty one would
                // route as "" (found by the client_hello fuzz target).
                if name.is_empty() {
                    return Err(ClientHelloError::Malformed("empty server name"));
                }
                let name = std::str::from_utf8(name)
                    .ok()
                    .filter(|n| n.is_ascii())
                    .ok_or(ClientHelloError::Malformed("server name is not ASCII"))?;
                return Ok(Peek::ClientHello {
                    server_name: Some(name.to_ascii_lowercase()),
                });
            }
        }
    }
    Ok(Peek::ClientHello { server_name: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_server_name_of_a_real_client_hello() {
        let hello = client_hello("Backend.Example");
        assert_eq!(
            peek(&hello),
            Ok(Peek::ClientHello {
                server_name: Some("backend.example".into())
            })
        );
        // Every strict prefix asks for more rather than failing.
        for n in 0..hello.len() {
            assert_eq!(peek(&hello[..n]), Ok(Peek::Incomplete), "prefix {n}");
        }
    }

    #[test]
    fn an_empty_or_non_ascii_server_name_is_malformed() {
        let hello = client_hello("ab.example");
        let at = hello.windows(10).position(|w| w == b"ab.example").unwrap();
        // The name's 16-bit length is just before it; the list's and the extension's before
        // that. Rewrite the name as "\u{e9}b.example" (two UTF-8 bytes for one).
        let mut accented = hello.clone();
        accented[at..at + 2].copy_from_slice("\u{e9}".as_bytes());
        assert_eq!(
            peek(&accented),
            Err(ClientHelloError::Malformed("server name is not ASCII"))
        );
        // The regression seed the fuzz target found: a server_name entry of length 0.
        let crash = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fuzz/corpus/client_hello/seed-empty-server-name"
        ))
        .unwrap();
        assert_eq!(
            peek(&crash),
            Err(ClientHelloError::Malformed("empty server name"))
        );
    }

    #[test]
    fn ip_address_targets_carry_no_server_name() {
        let hello = client_hello("127.0.0.1");
        assert_eq!(peek(&hello), Ok(Peek::ClientHello { server_name: None }));
    }

    #[test]
    fn rejects_non_tls_oversized_and_malformed_input() {
        assert_eq!(
            peek(b"GET / HTTP/1.1\r\n"),
            Err(ClientHelloError::NotTls(b'G'))
        );
        assert_eq!(
            peek(&[22, 3, 1, 0xff, 0xff]),
            Err(ClientHelloError::Oversized(5 + 0xffff))
        );
        assert_eq!(
            peek(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Err(ClientHelloError::NotClientHello(2))
        );
        // Cut 10 bytes off the end and shrink both outer lengths to match: the extensions
        // block now claims more than the message holds.
        let mut hello = client_hello("a.example");
        hello.truncate(hello.len() - 10);
        let record_len = u16::try_from(hello.len() - 5).unwrap();
        hello[3..5].copy_from_slice(&record_len.to_be_bytes());
        let msg_len = u32::from(record_len) - 4;
        hello[6..9].copy_from_slice(&msg_len.to_be_bytes()[1..]);
        assert_eq!(peek(&hello), Err(ClientHelloError::Malformed("extensions")));
    }
}
