//! The splice(2) interface: pipes, a node-wide pool of them ([`PipePool`]), and non-blocking
//! splice calls between a socket and a pipe. This module is the only place that calls
//! pipe2/splice.
//!
//! Bytes moved this way never enter user space: from a kTLS RX socket the kernel decrypts into
//! the pipe (`tls_sw_splice_read`), into a kTLS TX socket it encrypts from the pipe's pages.
#![allow(unsafe_code)]

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

/// A kernel pipe used as the in-kernel buffer between two sockets. Both ends are non-blocking
/// and close-on-exec; dropping the pipe closes both.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// Creates a pipe, and asks for `capacity` bytes of buffer (the kernel may round it, or
    /// refuse above /proc/sys/fs/pipe-max-size, in which case the default 64 KiB stays).
    pub fn new(capacity: usize) -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "pipe2: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours. Failure
        // (EPERM above pipe-max-size) leaves the default size, which still works.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        Ok(Self { read, write })
    }

    /// The end splice writes into.
    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// The end splice reads from.
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Whether the pipe holds no bytes (`FIONREAD`); `false` when that cannot be read.
    fn is_empty(&self) -> bool {
        let mut n: libc::c_int = -1;
        // SAFETY: FIONREAD writes one int, the bytes buffered in the pipe, into `n`.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &raw mut n) };
        rc == 0 && n == 0
    }
}

/// Pipes shared by every spliced direction of the process. A direction borrows one only while
/// bytes are in flight ([`PipePool::take`]) and gives it back empty, so an idle connection holds
/// none and the process holds at most `max` (two descriptors each). A pipe that still holds
/// bytes when its lease ends (a failed direction) is closed, never reused: another connection
/// must never read them.
#[derive(Debug)]
pub struct PipePool {
    /// Empty pipes ready to lend, at most `keep_idle`.
    idle: Mutex<Vec<Pipe>>,
    /// One place per pipe that may exist at once.
    places: Semaphore,
    max: usize,
    keep_idle: usize,
    /// Buffer size asked of each new pipe.
    capacity: usize,
    in_use: AtomicUsize,
    waits: AtomicU64,
}

/// What a [`PipePool`] holds now, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeCounts {
    /// Lent to a direction with bytes in flight.
    pub in_use: usize,
    /// Empty, kept for the next direction.
    pub idle: usize,
    /// The most that may exist at once.
    pub max: usize,
    /// Times a direction had to wait because `max` pipes were lent.
    pub waits: u64,
}

/// Empty pipes kept open for reuse, at most: enough for bursts of traffic on a few dozen
/// connections without a pipe2 call each, few enough that an idle node holds almost nothing.
const KEEP_IDLE: usize = 32;

impl PipePool {
    /// A pool of at most `max` pipes of `capacity` bytes each.
    pub fn new(max: usize, capacity: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            places: Semaphore::new(max),
            max,
            keep_idle: KEEP_IDLE.min(max),
            capacity,
            in_use: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// Lends an empty pipe, waiting while `max` are lent; an error is pipe2's (e.g. EMFILE).
    pub async fn take(&self) -> io::Result<PipeLease<'_>> {
        let place = match self.places.try_acquire() {
            Ok(place) => place,
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                self.places
                    .acquire()
                    .await
                    .map_err(|_| io::Error::other("the pipe pool is closed"))?
            }
        };
        let reused = self.idle().pop();
        let pipe = match reused {
            Some(pipe) => pipe,
            None => Pipe::new(self.capacity)?,
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(PipeLease {
            pool: self,
            pipe: ManuallyDrop::new(pipe),
            held: 0,
            _place: place,
        })
    }

    /// What the pool holds now.
    pub fn counts(&self) -> PipeCounts {
        PipeCounts {
            in_use: self.in_use.load(Ordering::Relaxed),
            idle: self.idle().len(),
            max: self.max,
            waits: self.waits.load(Ordering::Relaxed),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pipe lent by a [`PipePool`]; it goes back when dropped, if empty. The borrower says what
/// it put in ([`PipeLease::filled`]) and took out ([`PipeLease::drained`]).
#[derive(Debug)]
pub struct PipeLease<'a> {
    pool: &'a PipePool,
    /// Taken out only by Drop, which gives it back to the pool or closes it.
    pipe: ManuallyDrop<Pipe>,
    /// Bytes in the pipe now.
    held: usize,
    _place: SemaphorePermit<'a>,
}

impl PipeLease<'_> {
    /// The end splice writes into.
    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.pipe.write_end()
    }

    /// The end splice reads from.
    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.pipe.read_end()
    }

    /// `n` bytes were spliced into the pipe.
    pub fn filled(&mut self, n: usize) {
        self.held += n;
    }

    /// `n` bytes were spliced out of the pipe.
    pub fn drained(&mut self, n: usize) {
        self.held = self.held.saturating_sub(n);
    }

    /// Takes the `len` bytes left in the pipe out into memory (for a receiver that stopped
    /// taking them), so the pipe can go back to the pool.
    pub fn spill(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let rest = &mut bytes[got..];
            // SAFETY: `rest` is writable memory of `rest.len()` bytes that read(2) fills; the
            // descriptor is the pipe's own read end, open while `self` lives.
            let rc = unsafe {
                libc::read(
                    self.pipe.read_end().as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                )
            };
            match rc {
                n if n > 0 => got += n as usize,
                // Fewer bytes than spliced in: the count is wrong; the pipe will be closed.
                0 => break,
                _ => return Err(io::Error::last_os_error()),
            }
        }
        bytes.truncate(got);
        self.drained(got);
        Ok(bytes)
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: drop runs once, and nothing uses `self.pipe` after this line.
        let pipe = unsafe { ManuallyDrop::take(&mut self.pipe) };
        // The borrower's count, and the kernel's: a pipe goes back only when both say empty.
        if self.held == 0 && pipe.is_empty() {
            let mut idle = self.pool.idle();
            if idle.len() < self.pool.keep_idle {
                idle.push(pipe);
            }
        }
    }
}

/// Moves up to `len` bytes from `from` to `to` without blocking (`SPLICE_F_NONBLOCK`), one of
/// which must be a pipe. `Ok(0)` from a socket means end of stream; `WouldBlock` means try again
/// when ready.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the call; null offsets are what
    // splice requires for pipes and sockets; no memory of ours is passed.
    let rc = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An emptied pipe goes back to the pool and is lent again; one that still holds bytes is
    /// closed, so no connection can read another's; at the limit a taker waits until a pipe
    /// comes back, and says so in the count of waits.
    #[tokio::test]
    async fn the_pool_reuses_empty_pipes_only_and_waits_at_its_limit() {
        let pool = PipePool::new(2, 64 * 1024);
        let first = pool.take().await.unwrap();
        let reused = first.read_end().as_raw_fd();
        drop(first);
        assert_eq!(pool.counts().idle, 1);
        let mut again = pool.take().await.unwrap();
        assert_eq!(
            again.read_end().as_raw_fd(),
            reused,
            "an empty pipe is lent again"
        );
        assert_eq!(pool.counts().in_use, 1);

        // Bytes left in it: closed, not kept.
        let n = write_into(again.write_end(), b"left over");
        again.filled(n);
        drop(again);
        assert_eq!(
            pool.counts(),
            PipeCounts {
                in_use: 0,
                idle: 0,
                max: 2,
                waits: 0
            }
        );

        let a = pool.take().await.unwrap();
        let b = pool.take().await.unwrap();
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), pool.take()).await;
        assert!(third.is_err(), "a third pipe was lent with a limit of two");
        assert_eq!(pool.counts().waits, 1);
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), pool.take())
            .await
            .expect("a pipe came back")
            .unwrap();
        assert_eq!(pool.counts().in_use, 2);
        drop((b, c));
        assert_eq!(pool.counts().in_use, 0);
        assert_eq!(pool.counts().idle, 2);
    }

    /// Writes `data` into a pipe's write end.
    fn write_into(fd: BorrowedFd<'_>, data: &[u8]) -> usize {
        let mut f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        std::io::Write::write(&mut f, data).unwrap()
    }
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Socket -> pipe -> socket moves the bytes unchanged, and a closed peer reads as 0.
    #[test]
    fn splices_between_sockets_through_a_pipe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let listener2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(listener2.local_addr().unwrap()).unwrap();
        let (mut d, _) = listener2.accept().unwrap();
        let pipe = Pipe::new(1 << 20).unwrap();
        a.write_all(b"spliced bytes").unwrap();
        drop(a);
        let mut moved = 0;
        loop {
            match splice(b.as_fd(), pipe.write_end(), 1 << 16) {
                Ok(0) => break,
                Ok(n) => {
                    let mut left = n;
                    while left > 0 {
                        left -= splice(pipe.read_end(), c.as_fd(), left).unwrap();
                    }
                    moved += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(c);
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!(moved, 13);
        assert_eq!(got, b"spliced bytes");
    }
}
