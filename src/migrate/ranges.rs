//! Guest pages moved through a socket in pieces: host byte ranges with adjacent pages merged,
//! and a cursor that says how far a transfer has got and hands out the iovecs of the rest for
//! the next vectored call (readv on the destination, vmsplice on the source).

use crate::machine::memory::PAGE_SIZE;

/// Linux's limit on the buffers of one vectored call (IOV_MAX).
pub const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

/// Appends the page at host address `host` to `ranges`, merged with the last range if it
/// follows it.
pub fn push_page(ranges: &mut Vec<(usize, usize)>, host: usize) {
    let page = PAGE_SIZE as usize;
    match ranges.last_mut() {
        Some((start, len)) if *start + *len == host => *len += page,
        _ => ranges.push((host, page)),
    }
}

/// How far a transfer has got through `(host address, length)` ranges.
pub struct Cursor<'a> {
    ranges: &'a [(usize, usize)],
    index: usize,
    offset: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(ranges: &'a [(usize, usize)]) -> Self {
        Self {
            ranges,
            index: 0,
            offset: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.index == self.ranges.len()
    }

    /// What is left, as at most [`MAX_IOVECS`] iovecs.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.ranges[self.index..]
            .iter()
            .take(MAX_IOVECS)
            .enumerate()
            .map(|(i, &(start, len))| {
                let skip = if i == 0 { self.offset } else { 0 };
                libc::iovec {
                    iov_base: (start + skip) as *mut libc::c_void,
                    iov_len: len - skip,
                }
            })
            .collect()
    }

    /// Moves past `bytes` more bytes, which must not go beyond the end.
    pub fn advance(&mut self, mut bytes: usize) {
        while bytes > 0 {
            let remaining = self.ranges[self.index].1 - self.offset;
            if bytes < remaining {
                self.offset += bytes;
                return;
            }
            bytes -= remaining;
            self.index += 1;
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_pages_merge_and_the_cursor_walks_across_ranges() {
        let page = PAGE_SIZE as usize;
        let mut ranges = Vec::new();
        for host in [0x10000, 0x10000 + page, 0x40000] {
            push_page(&mut ranges, host);
        }
        assert_eq!(ranges, [(0x10000, 2 * page), (0x40000, page)]);
        let mut cursor = Cursor::new(&ranges);
        cursor.advance(page + 100);
        let left = cursor.iovecs();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].iov_base as usize, 0x10000 + page + 100);
        assert_eq!(left[0].iov_len, page - 100);
        cursor.advance(page - 100);
        assert_eq!(cursor.iovecs()[0].iov_base as usize, 0x40000);
        assert!(!cursor.is_done());
        cursor.advance(page);
        assert!(cursor.is_done());
    }
}
