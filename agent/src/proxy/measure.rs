//! What each plain-leg path (splice, sockmap) costs on this kernel, measured once at start for
//! `ebpf.passthrough = "auto"`: loopback traffic relayed for a moment over each path through the
//! same relay code connections use, with the node's CPU time read before and after. The choice
//! itself is [`PlainPath`]'s, a pure function of the figures.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use super::relay;
use crate::bpf::LoadedBpf;
use crate::config::PassthroughPath;
use crate::path::{PathCost, PlainPath, PlainPlan};

/// How long each path is measured for by `passthrough = "auto"`.
const MEASURE_FOR: Duration = Duration::from_millis(400);

/// The node's passthrough path: as configured, or for `auto` by measuring both paths here.
/// `ebpf` is the loaded eBPF programs, or why they are off. `Err`: the configuration asks for
/// sockmap explicitly and it cannot be had; the agent must not start.
pub async fn decide(
    wanted: PassthroughPath,
    ebpf: Result<&LoadedBpf, &str>,
) -> Result<PlainPath, String> {
    let bpf = match PlainPath::plan(wanted, ebpf)? {
        PlainPlan::Decided(path) => return Ok(path),
        PlainPlan::Measure(bpf) => bpf,
    };
    let measured =
        async { Ok::<_, io::Error>((measure(false, bpf).await?, measure(true, bpf).await?)) };
    Ok(match measured.await {
        Ok((splice, sockmap)) => {
            let path = PlainPath::from_costs(splice, sockmap);
            tracing::info!(
                chosen = if path.is_sockmap() {
                    "sockmap"
                } else {
                    "splice"
                },
                "{}",
                path.why()
            );
            path
        }
        Err(e) => {
            tracing::warn!(error = %e, "measuring the passthrough paths failed: splice");
            PlainPath::measuring_failed(&e)
        }
    })
}

/// Relays loopback traffic for [`MEASURE_FOR`] over one plain-leg path, the way a passthrough
/// connection is relayed, and returns what it cost the node.
async fn measure(sockmap: bool, bpf: &crate::bpf::LoadedBpf) -> io::Result<PathCost> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let back = TcpListener::bind("127.0.0.1:0").await?;
    let (front_addr, back_addr) = (front.local_addr()?, back.local_addr()?);
    let stop = Arc::new(AtomicBool::new(false));
    let sender_stop = stop.clone();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut sock = std::net::TcpStream::connect(front_addr)?;
        let chunk = vec![0u8; 256 * 1024];
        while !sender_stop.load(Ordering::Relaxed) {
            sock.write_all(&chunk)?;
        }
        sock.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest)?;
        Ok(())
    });
    let sink = std::thread::spawn(move || -> io::Result<u64> {
        let listener = back.into_std()?;
        listener.set_nonblocking(false)?;
        let (mut sock, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match sock.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let (client, _) = front.accept().await?;
    let upstream = TcpStream::connect(back_addr).await?;
    let cpu_before = crate::probe::node_busy_seconds()?;
    let started = Instant::now();
    let timer_stop = stop.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(MEASURE_FOR).await;
        timer_stop.store(true, Ordering::Relaxed);
    });
    let outcome = if sockmap {
        match relay::sockmap::enter(&client, &upstream, bpf, tlsplice_common::NO_LISTENER) {
            Ok(relay::sockmap::Entry::Entered(pair, starts)) => {
                relay::sockmap::finish(&client, &upstream, pair, starts).await
            }
            Ok(relay::sockmap::Entry::Failed(failure)) => {
                return Err(io::Error::other(failure.to_string()));
            }
            Err(why) => return Err(io::Error::other(why)),
        }
    } else {
        // Its own two pipes: the measurement runs before the listeners serve.
        let pipes = crate::splice::PipePool::new(2, relay::splice::SPLICE_CHUNK);
        relay::splice::relay_plain(&pipes, &client, &upstream).await
    };
    stop.store(true, Ordering::Relaxed);
    timer.abort();
    outcome
        .result
        .map_err(|f| io::Error::other(f.to_string()))?;
    drop((client, upstream));
    let joined = |r: std::thread::Result<io::Result<u64>>| {
        r.map_err(|_| io::Error::other("measurement thread panicked"))?
    };
    let moved = joined(sink.join())?;
    joined(sender.join().map(|r| r.map(|()| 0)))?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = crate::probe::node_busy_seconds()? - cpu_before;
    if moved == 0 {
        return Err(io::Error::other("no bytes moved"));
    }
    let gib = moved as f64 / f64::from(1u32 << 30);
    Ok(PathCost {
        cpu_seconds_per_gib: cpu / gib,
        mib_per_second: moved as f64 / f64::from(1u32 << 20) / seconds,
    })
}
