//! The small kernel interfaces that are neither kTLS ([`crate::ktls`]), splice
//! ([`crate::splice`]) nor BPF ([`crate::bpf`]): TCP state and counters (`TCP_INFO`,
//! `SIOCOUTQ`), socket cookies and options, the open-file limit, transparent huge pages off for
//! the process (`PR_SET_THP_DISABLE`), and the file-system calls that
//! the BPF pin directory needs (statfs, flock, mount), and the epoll set of parked connections
//! put on the runtime. The only place they are called.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// Raises this process's open-file soft limit to its hard limit: every relayed connection holds
/// two sockets and, on the splice paths, two pipes, so the usual soft limit of 1024 caps a node
/// at a few hundred connections. Returns the new soft limit.
pub fn raise_open_files() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which is valid and writable.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`): where a kernel
/// has them on for every mapping (`enabled = always`, as Debian's kernels do), a fault and
/// khugepaged back the allocator's sparse heap with 2 MiB pages, so memory freed after a burst
/// stays resident (in a 6.1 guest the heap's mapping went from 3 to 6 huge pages over a
/// 30-second soak while the allocator held 3.4 MiB, and RSS did not come back). The agent's
/// memory is many small connection states, which huge pages do not speed up.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // The kernel reads each argument as an unsigned long.
    let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and three zero arguments; it reads and
    // writes no memory of this process.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's cookie for a socket (the sock hash key).
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the call; `cookie` and `len` are valid, writable and
    // sized for SO_COOKIE's u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets SO_RCVLOWAT to 1 (its default). Setting it re-runs the socket's data-ready callback,
/// which makes a sock hash verdict look at bytes queued before the socket entered the map.
pub fn rerun_data_ready(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a live socket; SO_RCVLOWAT reads one int from `one`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The head of the kernel's `struct tcp_info` up to `tcpi_bytes_received` (libc's glibc version
/// stops before it). Layout from include/uapi/linux/tcp.h, stable since 4.x.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    bytes8: [u8; 8],
    words: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

const _: () = assert!(
    std::mem::size_of::<TcpInfoHead>() == 136
        && std::mem::offset_of!(TcpInfoHead, bytes_acked) == 120
        && std::mem::offset_of!(TcpInfoHead, bytes_received) == 128
);

/// `TCP_ESTABLISHED` from include/net/tcp_states.h.
const TCP_ESTABLISHED: u8 = 1;
/// `TCP_CLOSE_WAIT`: the peer has sent its FIN; this side can still send.
const TCP_CLOSE_WAIT: u8 = 8;

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfoHead> {
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket; `info` is writable for `len` bytes and the kernel writes
    // at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
        return Err(io::Error::other(
            "kernel's tcp_info has no tcpi_bytes_received",
        ));
    }
    Ok(info)
}

/// Whether a TCP socket is established and has not received a FIN: the only state in which
/// it may enter a sock hash.
pub fn tcp_established(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(tcp_info(fd)?.bytes8[0] == TCP_ESTABLISHED)
}

/// TCP states (include/net/tcp_states.h) in which the peer's FIN has been received.
const PEER_CLOSED_STATES: [u8; 5] = [
    TCP_CLOSE_WAIT,
    6,  // TCP_TIME_WAIT
    7,  // TCP_CLOSE
    9,  // TCP_LAST_ACK
    11, // TCP_CLOSING
];

/// What a TCP socket's receive side holds after a read of 0 bytes: whether the peer has sent
/// its FIN, and the bytes still in the receive queue. A socket with the kernel's TLS reads 0
/// for a zero-length application data record (RFC 8446 5.1 allows them) and for a FIN after
/// part of a record, as well as at its end.
pub fn receive_side(fd: BorrowedFd<'_>) -> io::Result<(bool, usize)> {
    let peer_closed = PEER_CLOSED_STATES.contains(&tcp_info(fd)?.bytes8[0]);
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ on a TCP socket) writes one int to the pointer it is given,
    // which is valid and writable for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((peer_closed, usize::try_from(queued).unwrap_or(0)))
}

/// Whether a socket has something for a reader: bytes, its peer's end, or an error. Asked with
/// a zero-timeout `poll`, which consumes nothing: a peek or `SO_ERROR` would take a pending
/// error (a reset) off the socket, and the relay that reads it next would see an end instead.
pub fn has_input(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pollfd` is one valid, writable entry and the count says one; a zero timeout
    // returns at once.
    let rc = unsafe { libc::poll(&raw mut pollfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0 && pollfd.revents != 0)
}

/// The send sequence consumed on a TCP socket so far (acknowledged plus still queued: the bytes
/// written, plus the SYN and a FIN), and whether the socket can still send. Differences of this
/// value count bytes queued.
pub fn tcp_bytes_queued(fd: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
    let info = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for sockets) writes one int, the bytes not yet acknowledged,
    // into `outq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let sending = matches!(info.bytes8[0], TCP_ESTABLISHED | TCP_CLOSE_WAIT);
    Ok((info.bytes_acked + u64::try_from(outq).unwrap_or(0), sending))
}

/// Bytes a TCP socket has received plus bytes its peer has acknowledged: it grows whenever
/// anything moves either way, whoever moves it (the agent, splice, kTLS, a sockmap redirect).
pub fn tcp_progress(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    Ok(info.bytes_acked.wrapping_add(info.bytes_received))
}

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Whether `path` is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = c_path(path)?;
    // SAFETY: statfs is all-integer plain data, so zeroed is a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `buf` is a valid,
    // writable statfs.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets.
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a BPF filesystem on the directory `path` (needs CAP_SYS_ADMIN).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    let fstype = c"bpf";
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data
    // argument is passed.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes an exclusive lock on an open file without waiting; `Ok(false)` when another process
/// holds it.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor the caller owns for the call; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// An epoll set (the parked connections' of a listener) put on the runtime: readable when it
/// has events to take.
pub fn epoll_on_runtime(poll: mio::Poll) -> io::Result<tokio::io::unix::AsyncFd<mio::Poll>> {
    // SAFETY: `mio::Poll` owns its epoll descriptor from creation until it is dropped, and its
    // `as_raw_fd` always returns that descriptor; the `AsyncFd` owns the `Poll`, so the
    // descriptor stays open and the same for the whole registration.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)
    };
    Ok(registered?)
}
