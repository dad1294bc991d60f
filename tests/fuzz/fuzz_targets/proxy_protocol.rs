//! PROXY protocol headers the agent writes (from addresses and a client's TLS facts), read back
//! by the `ppp` crate as a receiver would: every field comes back as it went in.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tlsplice::config::ProxyProtocol;
use tlsplice::proxy_protocol::{ClientTls, header};

/// Takes `n` bytes off the front of `data` (fewer at its end).
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fn addr(data: &mut &[u8], v6: bool) -> SocketAddr {
    let port = take(data, 2);
    let port = u16::from_be_bytes([
        port.first().copied().unwrap_or(0),
        port.get(1).copied().unwrap_or(0),
    ]);
    let ip = if v6 {
        let mut b = [0u8; 16];
        let src = take(data, 16);
        b[..src.len()].copy_from_slice(src);
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        let mut b = [0u8; 4];
        let src = take(data, 4);
        b[..src.len()].copy_from_slice(src);
        IpAddr::V4(Ipv4Addr::from(b))
    };
    SocketAddr::new(ip, port)
}

fn text(data: &mut &[u8]) -> String {
    let n = usize::from(take(data, 1).first().copied().unwrap_or(0));
    String::from_utf8_lossy(take(data, n)).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let flags = take(&mut data, 1).first().copied().unwrap_or(0);
    let v6 = flags & 1 == 1;
    let (source, destination) = (addr(&mut data, v6), addr(&mut data, v6));
    let tls = (flags & 2 == 2).then(|| ClientTls {
        version: text(&mut data),
        cipher: text(&mut data),
        sni: (flags & 4 == 4).then(|| text(&mut data)),
        alpn: (flags & 8 == 8).then(|| take(&mut data, 64).to_vec()),
        certificate: None,
    });
    if flags & 16 == 16 {
        let v1 = header(ProxyProtocol::V1, source, destination, None).expect("v1 header");
        let text = String::from_utf8(v1).expect("v1 is text");
        let parsed = ppp::v1::Header::try_from(text.as_str()).expect("ppp reads our v1 header");
        let expected = ppp::v1::Addresses::from((source, destination));
        assert_eq!(parsed.addresses, expected);
        return;
    }
    let Ok(bytes) = header(ProxyProtocol::V2, source, destination, tls.as_ref()) else {
        // Too long for a v2 header's 16-bit length: refused, not truncated.
        return;
    };
    let parsed = ppp::v2::Header::try_from(bytes.as_slice()).expect("ppp reads our v2 header");
    assert_eq!(
        parsed.addresses,
        ppp::v2::Addresses::from((source, destination))
    );
    let tlvs: Vec<_> = parsed
        .tlvs()
        .collect::<Result<_, _>>()
        .expect("every TLV parses");
    if let Some(tls) = &tls {
        if let Some(sni) = &tls.sni {
            assert!(
                tlvs.iter()
                    .any(|t| t.kind == 0x02 && t.value.as_ref() == sni.as_bytes()),
                "SNI TLV missing"
            );
        }
        if let Some(alpn) = tls.alpn.as_ref().filter(|a| !a.is_empty()) {
            assert!(
                tlvs.iter()
                    .any(|t| t.kind == 0x01 && t.value.as_ref() == alpn.as_slice()),
                "ALPN TLV missing"
            );
        }
    } else {
        assert!(tlvs.is_empty());
    }
});
