//! Per-source admission: how many connections one client (its address, or its /24 or /64 when
//! configured) holds on a listener, and how fast it may open new ones, each of which costs a
//! handshake. Checked in the accept loop, before a byte of the client is read, so a flood from
//! one source is refused before it costs CPU and leaves room for every other source.
//!
//! The decision is a pure function ([`decide`], table-tested); [`SourceTable`] keeps the counts.
//! The rate is a token bucket in its GCRA form (one deadline per source instead of a count and
//! a time), so a source's whole state is two integers, and a source holding no connection whose
//! bucket is full again needs no entry at all.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// How fast one source may open new connections: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    /// New connections per second, on average (above 0).
    pub(crate) per_second: u32,
    /// New connections at once after a quiet spell (above 0).
    pub(crate) burst: u32,
}

impl Rate {
    /// Nanoseconds between two connections at the average rate.
    fn interval_ns(self) -> u64 {
        1_000_000_000 / u64::from(self.per_second.max(1))
    }
}

/// The per-source limits a listener applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceLimits {
    /// Connections one source may hold at once on this listener.
    pub(crate) connections: Option<u32>,
    /// How fast one source may open new connections on this listener.
    pub(crate) rate: Option<Rate>,
    /// Leading bits of an IPv4 client address that name its source (32: each address).
    pub(crate) prefix_v4: u8,
    /// Leading bits of an IPv6 client address that name its source (128: each address).
    pub(crate) prefix_v6: u8,
}

impl From<crate::config::PerSourceLimits> for SourceLimits {
    fn from(l: crate::config::PerSourceLimits) -> Self {
        Self {
            connections: l.connections,
            rate: l.handshakes_per_second.map(|per_second| Rate {
                per_second,
                burst: l.handshake_burst.unwrap_or(per_second),
            }),
            prefix_v4: l.prefix_v4,
            prefix_v6: l.prefix_v6,
        }
    }
}

impl SourceLimits {
    /// Whether any per-source limit applies (when none does, sources are not tracked).
    pub(crate) fn any(&self) -> bool {
        self.connections.is_some() || self.rate.is_some()
    }
}

/// A client address masked to its source prefix. IPv4 clients of a dual-stack listener
/// (`::ffff:a.b.c.d`) are IPv4 sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// An IPv4 network: address bits, prefix length.
    V4(u32, u8),
    /// An IPv6 network: address bits, prefix length.
    V6(u128, u8),
}

impl Source {
    /// The source `ip` belongs to when IPv4 sources are `prefix_v4` bits long and IPv6 ones
    /// `prefix_v6`.
    pub(crate) fn of(ip: IpAddr, prefix_v4: u8, prefix_v6: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = prefix_v4.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                Source::V4(u32::from(v4) & mask, bits)
            }
            IpAddr::V6(v6) => {
                let bits = prefix_v6.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                Source::V6(u128::from(v6) & mask, bits)
            }
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Source::V4(a, 32) => write!(f, "{}", std::net::Ipv4Addr::from(a)),
            Source::V4(a, bits) => write!(f, "{}/{bits}", std::net::Ipv4Addr::from(a)),
            Source::V6(a, 128) => write!(f, "{}", std::net::Ipv6Addr::from(a)),
            Source::V6(a, bits) => write!(f, "{}/{bits}", std::net::Ipv6Addr::from(a)),
        }
    }
}

/// Which per-source limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceRefusal {
    /// The source holds this many connections already.
    Connections(u32),
    /// The source opened connections faster than this rate allows.
    Rate(Rate),
}

/// What one source holds: its connections, and when its token bucket is next full (ns since
/// the table's epoch; GCRA's "theoretical arrival time").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    connections: u32,
    full_at_ns: u64,
}

impl Entry {
    /// Whether the entry says nothing a missing one would not: no connection held, a full
    /// bucket.
    fn idle(&self, now_ns: u64) -> bool {
        self.connections == 0 && self.full_at_ns <= now_ns
    }
}

/// Whether a source holding `held` connections, whose bucket is full at `full_at_ns`, may open
/// one more at `now_ns`; if so, when its bucket is full after it. A connection takes one
/// token; tokens come back at `rate.per_second`, up to `rate.burst`.
pub(crate) fn decide(
    held: u32,
    full_at_ns: u64,
    now_ns: u64,
    limits: &SourceLimits,
) -> Result<u64, SourceRefusal> {
    if let Some(max) = limits.connections
        && held >= max
    {
        return Err(SourceRefusal::Connections(max));
    }
    let Some(rate) = limits.rate else {
        return Ok(full_at_ns);
    };
    let interval = rate.interval_ns();
    // The bucket may be this far from full and still hold a token.
    let tolerance = interval.saturating_mul(u64::from(rate.burst.max(1) - 1));
    let start = full_at_ns.max(now_ns);
    if start - now_ns > tolerance {
        return Err(SourceRefusal::Rate(rate));
    }
    Ok(start.saturating_add(interval))
}

/// Shards of the table: admissions from different sources rarely wait on one lock.
const SHARDS: usize = 16;
/// A shard is swept of idle entries when it has grown to twice its size after the last sweep
/// (and at least this many), so sweeping costs O(1) per admission on average.
const SWEEP_AT_LEAST: usize = 64;

#[derive(Debug, Default)]
struct Shard {
    entries: HashMap<Source, Entry>,
    /// Entries left by the last sweep.
    swept_len: usize,
}

/// The sources a listener's connections come from. An entry lives while its source holds a
/// connection or its bucket is not yet full, so the table holds at most the held connections'
/// sources plus those that opened one within the last `burst / per_second` seconds.
#[derive(Debug)]
pub(crate) struct SourceTable {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    epoch: Instant,
}

impl Default for SourceTable {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
        }
    }
}

impl SourceTable {
    fn shard(&self, source: &Source) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(source) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Admits one more connection from `source` under `limits`: its place, given back when
    /// dropped, or which limit refuses it.
    pub(crate) fn admit(
        self: &Arc<Self>,
        source: Source,
        limits: &SourceLimits,
    ) -> Result<SourcePlace, SourceRefusal> {
        let now = self.now_ns();
        let mut shard = self.shard(&source);
        let current = shard.entries.get(&source).copied().unwrap_or_default();
        let full_at_ns = decide(current.connections, current.full_at_ns, now, limits)?;
        shard.entries.insert(
            source,
            Entry {
                connections: current.connections + 1,
                full_at_ns,
            },
        );
        let len = shard.entries.len();
        if len >= SWEEP_AT_LEAST.max(2 * shard.swept_len) {
            shard.entries.retain(|_, e| !e.idle(now));
            shard.swept_len = shard.entries.len();
        }
        Ok(SourcePlace {
            table: self.clone(),
            source,
        })
    }

    /// A place for a connection the agent before this one had admitted (a takeover): counted
    /// against its source's connections, but neither refused by its limits nor charged to its
    /// rate (the connection is not new).
    pub(crate) fn place_moved(self: &Arc<Self>, source: Source) -> SourcePlace {
        let mut shard = self.shard(&source);
        let entry = shard.entries.entry(source).or_default();
        entry.connections += 1;
        SourcePlace {
            table: self.clone(),
            source,
        }
    }

    /// Sources with an entry (held connections, or a bucket not yet full).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).entries.len())
            .sum()
    }

    fn release(&self, source: &Source) {
        let now = self.now_ns();
        let mut shard = self.shard(source);
        if let Some(e) = shard.entries.get_mut(source) {
            e.connections = e.connections.saturating_sub(1);
            if e.idle(now) {
                shard.entries.remove(source);
            }
        }
    }
}

/// A connection's place under its source's limits, given back when dropped.
#[derive(Debug)]
pub(crate) struct SourcePlace {
    table: Arc<SourceTable>,
    source: Source,
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        self.table.release(&self.source);
    }
}

/// The node's handshake places, shared fairly among sources: when all are taken, a new
/// handshake waits in its source's queue, and each place given back goes to the next source in
/// turn (round robin), so a source with many handshakes waiting delays another source's by one
/// turn, not by its whole queue.
#[derive(Debug)]
pub(crate) struct HandshakeGate {
    state: Mutex<GateState>,
    /// Handshakes in progress at once.
    max: usize,
    /// Handshakes waiting at once; past it, a new one is refused at once.
    max_waiting: usize,
}

#[derive(Debug, Default)]
struct GateState {
    in_use: usize,
    waiting: usize,
    /// Each waiting source's handshakes, first come first.
    queues:
        HashMap<Source, std::collections::VecDeque<tokio::sync::oneshot::Sender<HandshakePlace>>>,
    /// Sources with handshakes waiting, in turn.
    turns: std::collections::VecDeque<Source>,
}

impl GateState {
    /// Drops the waiters that gave up (their deadline passed) before their turn came.
    fn forget_gone(&mut self) {
        self.queues.retain(|_, q| {
            q.retain(|tx| !tx.is_closed());
            !q.is_empty()
        });
        let queues = &self.queues;
        self.turns.retain(|s| queues.contains_key(s));
        self.waiting = self.queues.values().map(|q| q.len()).sum();
    }
}

/// Why a handshake got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GateRefusal {
    /// Every place taken and the queue full.
    QueueFull,
    /// Waited until the deadline.
    Waited,
}

impl HandshakeGate {
    /// `max` handshakes at once, `max_waiting` more waiting.
    pub(crate) fn new(max: usize, max_waiting: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            max,
            max_waiting,
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one handshake from `source`: at once when one is free, else in its source's
    /// turn, waiting at most `wait`.
    pub(crate) async fn place(
        self: &Arc<Self>,
        source: Source,
        wait: std::time::Duration,
    ) -> Result<HandshakePlace, GateRefusal> {
        let rx = {
            let mut state = self.lock();
            if state.in_use < self.max {
                state.in_use += 1;
                return Ok(HandshakePlace {
                    gate: Some(self.clone()),
                });
            }
            if state.waiting >= self.max_waiting {
                state.forget_gone();
            }
            if state.waiting >= self.max_waiting {
                return Err(GateRefusal::QueueFull);
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            state.waiting += 1;
            let queue = state.queues.entry(source).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                state.turns.push_back(source);
            }
            rx
        };
        // A place sent after the deadline lands in a dropped receiver and is given back by its
        // drop; a waiter that gave up is skipped when its turn comes.
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(place)) => Ok(place),
            _ => Err(GateRefusal::Waited),
        }
    }

    /// Gives a place back: to the next waiting source's first live handshake, else free.
    fn give_back(self: &Arc<Self>) {
        let mut state = self.lock();
        while let Some(source) = state.turns.pop_front() {
            let Some(queue) = state.queues.get_mut(&source) else {
                continue;
            };
            let next = queue.pop_front();
            let more = !queue.is_empty();
            if more {
                state.turns.push_back(source);
            } else {
                state.queues.remove(&source);
            }
            let Some(tx) = next else { continue };
            state.waiting -= 1;
            let place = HandshakePlace {
                gate: Some(self.clone()),
            };
            match tx.send(place) {
                Ok(()) => return,
                // That handshake stopped waiting: the place goes on to the next; disarmed, so
                // its drop does not give it back a second time (under this lock).
                Err(mut place) => place.gate = None,
            }
        }
        state.in_use -= 1;
    }
}

/// A handshake's place under the node's limit, given back (to the next source in turn) when
/// dropped.
#[derive(Debug)]
pub(crate) struct HandshakePlace {
    gate: Option<Arc<HandshakeGate>>,
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limits(connections: Option<u32>, rate: Option<(u32, u32)>) -> SourceLimits {
        SourceLimits {
            connections,
            rate: rate.map(|(per_second, burst)| Rate { per_second, burst }),
            prefix_v4: 32,
            prefix_v6: 128,
        }
    }

    #[test]
    fn decide_applies_the_connection_count_then_the_bucket() {
        let r10 = Some((10, 5));
        // (held, full at, now, limits, decision)
        type Case = (u32, u64, u64, SourceLimits, Result<u64, SourceRefusal>);
        let cases: &[Case] = &[
            // No limit: always, the bucket untouched.
            (1_000, 0, S, limits(None, None), Ok(0)),
            // Under the count.
            (2, 0, S, limits(Some(3), None), Ok(0)),
            // At the count.
            (
                3,
                0,
                S,
                limits(Some(3), None),
                Err(SourceRefusal::Connections(3)),
            ),
            // Full bucket (full_at in the past): the first takes a token, full 100 ms later.
            (0, 0, S, limits(None, r10), Ok(S + S / 10)),
            // Four tokens taken (full 400 ms from now): the fifth of the burst still fits.
            (0, S + 4 * S / 10, S, limits(None, r10), Ok(S + 5 * S / 10)),
            // Five taken: the sixth at once is refused.
            (
                0,
                S + 5 * S / 10,
                S,
                limits(None, r10),
                Err(SourceRefusal::Rate(Rate {
                    per_second: 10,
                    burst: 5,
                })),
            ),
            // ... and fits again 100 ms later, when one token is back.
            (
                0,
                S + 5 * S / 10,
                S + S / 10,
                limits(None, r10),
                Ok(S + 6 * S / 10),
            ),
            // Burst 1: one per interval exactly.
            (0, S, S, limits(None, Some((2, 1))), Ok(S + S / 2)),
            (
                0,
                S + 1,
                S,
                limits(None, Some((2, 1))),
                Err(SourceRefusal::Rate(Rate {
                    per_second: 2,
                    burst: 1,
                })),
            ),
            // The count is checked first, and a refusal by it takes no token.
            (
                3,
                0,
                S,
                limits(Some(3), r10),
                Err(SourceRefusal::Connections(3)),
            ),
        ];
        for (i, (held, full_at, now, l, want)) in cases.iter().enumerate() {
            assert_eq!(decide(*held, *full_at, *now, l), *want, "case {i}");
        }
    }

    #[test]
    fn sources_are_addresses_masked_to_their_prefix() {
        let mut l = limits(Some(1), None);
        let v4: IpAddr = "10.1.2.3".parse().expect("v4");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("mapped");
        let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().expect("v6");
        assert_eq!(
            Source::of(v4, l.prefix_v4, l.prefix_v6).to_string(),
            "10.1.2.3"
        );
        assert_eq!(
            Source::of(mapped, l.prefix_v4, l.prefix_v6),
            Source::of(v4, l.prefix_v4, l.prefix_v6)
        );
        assert_eq!(
            Source::of(v6, l.prefix_v4, l.prefix_v6).to_string(),
            "2001:db8:1:2:3:4:5:6"
        );
        l.prefix_v4 = 24;
        l.prefix_v6 = 64;
        assert_eq!(
            Source::of(v4, l.prefix_v4, l.prefix_v6).to_string(),
            "10.1.2.0/24"
        );
        assert_eq!(
            Source::of(v6, l.prefix_v4, l.prefix_v6).to_string(),
            "2001:db8:1:2::/64"
        );
        l.prefix_v4 = 0;
        assert_eq!(
            Source::of(v4, l.prefix_v4, l.prefix_v6).to_string(),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn the_table_counts_places_and_forgets_idle_sources() {
        let table = Arc::new(SourceTable::default());
        let l = limits(Some(2), None);
        let a = Source::of("10.0.0.1".parse().expect("a"), l.prefix_v4, l.prefix_v6);
        let b = Source::of("10.0.0.2".parse().expect("b"), l.prefix_v4, l.prefix_v6);
        let a1 = table.admit(a, &l).expect("a first");
        let a2 = table.admit(a, &l).expect("a second");
        assert_eq!(
            table.admit(a, &l).err(),
            Some(SourceRefusal::Connections(2))
        );
        // Another source is not affected by a's.
        let b1 = table.admit(b, &l).expect("b first");
        assert_eq!(table.len(), 2);
        drop(a1);
        let a3 = table.admit(a, &l).expect("a again after one ended");
        drop((a2, a3, b1));
        // No connection held and no bucket: nothing kept.
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn many_passing_sources_are_swept() {
        let table = Arc::new(SourceTable::default());
        let l = limits(None, Some((1_000_000, 1)));
        for i in 0..10_000u32 {
            let source = Source::V4(i, 32);
            drop(table.admit(source, &l).expect("admitted"));
        }
        // Each bucket is full a microsecond after its one connection: a sweep keeps the table
        // near the sweep size, not at 10,000.
        assert!(table.len() < 2 * SHARDS * SWEEP_AT_LEAST, "{}", table.len());
    }

    #[tokio::test(start_paused = true)]
    async fn handshake_places_go_to_waiting_sources_in_turn() {
        let gate = HandshakeGate::new(1, 100);
        let wait = std::time::Duration::from_secs(60);
        let (a, b) = (Source::V4(1, 32), Source::V4(2, 32));
        let held = gate.place(a, wait).await.expect("the free place");
        // Three of a's wait, then one of b's.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, source) in [(0, a), (1, a), (2, a), (3, b)] {
            let (gate, tx) = (gate.clone(), tx.clone());
            tokio::spawn(async move {
                let place = gate.place(source, wait).await.expect("a place");
                let _ = tx.send(i);
                // Held a moment, then given back.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                drop(place);
            });
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.expect("served"));
        }
        // b's one goes second, not after all of a's.
        assert_eq!(order, vec![0, 3, 1, 2]);
        // The last one's place given back.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(gate.lock().in_use, 0);
        assert_eq!(gate.lock().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_a_waiter_that_gave_up_is_skipped() {
        let gate = HandshakeGate::new(1, 1);
        let long = std::time::Duration::from_secs(60);
        let a = Source::V4(1, 32);
        let held = gate.place(a, long).await.expect("the free place");
        // One waits for a second, and gives up.
        let gave_up = gate.place(a, std::time::Duration::from_secs(1)).await;
        assert_eq!(gave_up.err(), Some(GateRefusal::Waited));
        // Its sender is still queued: the queue is full until a give-back skips it.
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.place(a, long).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            gate.place(a, long).await.err(),
            Some(GateRefusal::QueueFull)
        );
        drop(held);
        waiter.await.expect("task").expect("the live waiter served");
        let state = gate.lock();
        assert_eq!((state.in_use, state.waiting), (0, 0));
    }
}
