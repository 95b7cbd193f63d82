//! Gathered writes: a frame batch as a sequence of byte slices (frame heads next to payloads
//! that stay where they are), and the iovecs for what is left of it after a partial write.
//! Both the server and the client write large packets this way instead of copying each
//! payload behind its head first.

use std::io::IoSlice;

/// Packets at least this large are written from where they already are (the reader's buffer
/// on the server, the caller's memory in the client) instead of being copied behind their
/// frame head; below it, one more iovec per packet costs more than copying the bytes (for
/// bulk traffic the copy was a sixth of the client's CPU).
pub const GATHER_MIN_PACKET: usize = 2 << 10;
/// Iovecs per gathered write: rustls takes at most its 64 KiB buffer limit per call, so more
/// would only be rebuilt on the next call.
pub const MAX_IOVECS: usize = 16;

/// The part of `segs` from byte `skip` on (a partial write leaves the rest of a slice).
pub fn remaining<'s>(
    segs: impl Iterator<Item = &'s [u8]>,
    mut skip: usize,
) -> impl Iterator<Item = &'s [u8]> {
    segs.filter_map(move |seg| {
        if skip >= seg.len() {
            skip -= seg.len();
            None
        } else {
            let rest = &seg[skip..];
            skip = 0;
            Some(rest)
        }
    })
}

/// Fills `iov` with the non-empty slices of `segs` from byte `skip` on, as many as fit;
/// returns how many entries were used.
pub fn fill_iovecs<'s>(
    segs: impl Iterator<Item = &'s [u8]>,
    skip: usize,
    iov: &mut [IoSlice<'s>],
) -> usize {
    let mut n = 0;
    for (slot, seg) in iov.iter_mut().zip(remaining(segs, skip)) {
        *slot = IoSlice::new(seg);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(segs: &[&[u8]], skip: usize, max: usize) -> Vec<u8> {
        let mut iov = vec![IoSlice::new(&[]); max];
        let n = fill_iovecs(segs.iter().copied(), skip, &mut iov);
        iov[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn skips_whole_and_partial_slices() {
        let segs: &[&[u8]] = &[b"ab", b"", b"cde", b"f"];
        assert_eq!(flat(segs, 0, 8), b"abcdef");
        assert_eq!(flat(segs, 2, 8), b"cdef");
        assert_eq!(flat(segs, 3, 8), b"def");
        assert_eq!(flat(segs, 6, 8), b"");
        assert_eq!(flat(segs, 9, 8), b"");
        // Empty slices never take an entry; the limit cuts the tail.
        assert_eq!(flat(segs, 0, 2), b"abcde");
    }
}
