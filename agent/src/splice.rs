//! The splice(2) interface: a pipe per direction and non-blocking splice calls between a socket
//! and the pipe. This module is the only place that calls pipe2/splice.
//!
//! Bytes moved this way never enter user space: from a kTLS RX socket the kernel decrypts into
//! the pipe (`tls_sw_splice_read`), into a kTLS TX socket it encrypts from the pipe's pages.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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
