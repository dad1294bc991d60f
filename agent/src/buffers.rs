//! Byte buffers a connection borrows for a moment (a read, a flush, a ClientHello peek, a
//! handshake) and gives back: an idle connection holds none, and a busy node does not allocate
//! and free a buffer of 16 KiB or more at each wake-up (jemalloc serves those sizes from its
//! shared arenas, and measured it as a tenth more CPU per handshake).
//!
//! A borrowed buffer holds whatever its last borrower left; borrowers use only the bytes they
//! have just read or written into it.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Buffers kept for reuse, at most, and the largest kept: 16 x 64 KiB is 1 MiB at worst (64
/// kept 2 MiB after a burst for good, which is what the memory-return test allows in all).
const KEEP: usize = 16;
const KEEP_UP_TO: usize = 64 * 1024;

static IDLE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer borrowed from the process's pool; it goes back when dropped.
#[derive(Debug)]
pub struct Buffer(Vec<u8>);

impl Buffer {
    /// A buffer of `len` bytes to read into.
    pub fn with_len(len: usize) -> Self {
        let mut bytes = take();
        // Shortening leaves the bytes as they are; only growth is zero-filled.
        bytes.resize(len, 0);
        Self(bytes)
    }

    /// An empty buffer to write into.
    pub fn empty() -> Self {
        let mut bytes = take();
        bytes.clear();
        Self(bytes)
    }
}

fn take() -> Vec<u8> {
    IDLE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default()
}

impl Deref for Buffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.0);
        if bytes.capacity() == 0 || bytes.capacity() > KEEP_UP_TO {
            return;
        }
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < KEEP {
            idle.push(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is lent again, at the length asked for; one too large is not kept.
    #[test]
    fn buffers_are_reused_at_the_length_asked() {
        let first = Buffer::with_len(1000);
        let address = first.as_ptr();
        drop(first);
        let again = Buffer::with_len(500);
        assert_eq!(again.len(), 500);
        assert_eq!(
            again.as_ptr(),
            address,
            "the buffer given back is lent again"
        );
        drop(again);
        let empty = Buffer::empty();
        assert!(empty.is_empty());
        drop(empty);
        let huge = Buffer::with_len(KEEP_UP_TO * 2);
        let huge_address = huge.as_ptr();
        drop(huge);
        let next = Buffer::with_len(10);
        assert_ne!(
            next.as_ptr(),
            huge_address,
            "a buffer over the size kept is freed"
        );
    }
}
