//! Criterion micro-benchmarks of the hot user-space pieces: the ClientHello peek that routes
//! passthrough connections, PROXY protocol v2 header encoding, and the splice loop that moves
//! bytes socket -> pipe -> socket.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tlsplice::config::ProxyProtocol;
use tlsplice::proxy_protocol::{ClientTls, header};
use tlsplice_tests::TestPki;

fn client_hello_peek(c: &mut Criterion) {
    let hello = TestPki::generate().client_hello();
    let mut group = c.benchmark_group("client_hello_peek");
    group.throughput(Throughput::Bytes(hello.len() as u64));
    group.bench_function("whole hello", |b| {
        b.iter(|| tlsplice::client_hello::peek(black_box(&hello)))
    });
    // A prefix: what the agent sees when the hello arrives in pieces.
    let half = &hello[..hello.len() / 2];
    group.bench_function("half a hello", |b| {
        b.iter(|| tlsplice::client_hello::peek(black_box(half)))
    });
    group.finish();
}

fn proxy_v2_encoding(c: &mut Criterion) {
    let source: SocketAddr = "10.1.2.3:45678".parse().expect("address");
    let destination: SocketAddr = "10.9.8.7:443".parse().expect("address");
    let tls = ClientTls {
        version: "TLSv1.3".into(),
        cipher: "TLS_AES_128_GCM_SHA256".into(),
        sni: Some("api.example.com".into()),
        alpn: Some(b"h2".to_vec()),
        certificate: None,
    };
    let mut group = c.benchmark_group("proxy_protocol");
    group.bench_function("v2 addresses only", |b| {
        b.iter(|| header(ProxyProtocol::V2, black_box(source), destination, None))
    });
    group.bench_function("v2 with TLS TLVs", |b| {
        b.iter(|| {
            header(
                ProxyProtocol::V2,
                black_box(source),
                destination,
                Some(&tls),
            )
        })
    });
    group.bench_function("v1", |b| {
        b.iter(|| header(ProxyProtocol::V1, black_box(source), destination, None))
    });
    group.finish();
}

/// socket -> pipe -> socket with the agent's splice wrapper, on a connected loopback pair whose
/// far end a thread keeps fed and drained.
fn splice_loop(c: &mut Criterion) {
    let mut group = c.benchmark_group("splice_loop");
    for chunk in [16 * 1024usize, 64 * 1024] {
        group.throughput(Throughput::Bytes(chunk as u64));
        group.bench_with_input(BenchmarkId::from_parameter(chunk), &chunk, |b, &chunk| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let mut feeder = std::net::TcpStream::connect(addr).expect("connect");
            let (inbound, _) = listener.accept().expect("accept");
            let outbound = std::net::TcpStream::connect(addr).expect("connect");
            let (mut sink, _) = listener.accept().expect("accept");
            let pipe = tlsplice::splice::Pipe::new(1 << 20).expect("pipe");
            let feed = std::thread::spawn(move || {
                let data = vec![0x5a; 256 * 1024];
                while feeder.write_all(&data).is_ok() {}
            });
            let drain = std::thread::spawn(move || {
                let mut buf = vec![0; 256 * 1024];
                while matches!(sink.read(&mut buf), Ok(n) if n > 0) {}
            });
            b.iter(|| {
                let mut moved = 0;
                while moved < chunk {
                    match tlsplice::splice::splice(inbound.as_fd(), pipe.write_end(), chunk - moved)
                    {
                        Ok(n) => moved += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::yield_now()
                        }
                        Err(e) => panic!("splice in: {e}"),
                    }
                }
                let mut out = 0;
                while out < moved {
                    match tlsplice::splice::splice(pipe.read_end(), outbound.as_fd(), moved - out) {
                        Ok(n) => out += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::yield_now()
                        }
                        Err(e) => panic!("splice out: {e}"),
                    }
                }
            });
            let _ = inbound.shutdown(Shutdown::Both);
            let _ = outbound.shutdown(Shutdown::Both);
            drop((inbound, outbound));
            let _ = drain.join();
            let _ = feed.join();
        });
    }
    group.finish();
}

criterion_group!(benches, client_hello_peek, proxy_v2_encoding, splice_loop);
criterion_main!(benches);
