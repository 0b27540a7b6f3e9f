//! A heap buffer aligned for `O_DIRECT`.
//!
//! Direct I/O needs the memory address, the length and the file offset
//! aligned to the device's logical block size. 4096 covers every logical
//! block size a card or stick reports (512 or 4096), so one alignment serves
//! all devices.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Memory alignment of every [`AlignedBuf`].
pub const ALIGN: usize = 4096;
/// Buffers this large are aligned to a huge page and backed by one where
/// the kernel allows: a direct write then pins two pages instead of 1024.
const HUGE: usize = 2 << 20;

/// A zero-initialised, 4096-aligned byte buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like Box<[u8]>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes; `len` is rounded up to a multiple of [`ALIGN`].
    ///
    /// # Panics
    /// If `len` is zero or the allocation fails.
    pub fn new(len: usize) -> Self {
        assert!(len > 0, "AlignedBuf of zero length");
        let len = len.next_multiple_of(ALIGN);
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        if len >= HUGE {
            // Advice only: must come before the first touch, and failure
            // (THP disabled) just leaves ordinary pages.
            // SAFETY: [ptr, ptr+len) is our own allocation, and HUGEPAGE
            // advice does not change its contents or validity.
            let _ = unsafe { nix::sys::mman::madvise(ptr.cast(), len, nix::sys::mman::MmapAdvise::MADV_HUGEPAGE) };
        }
        // SAFETY: ptr is valid for writes of len bytes; this initialises them.
        unsafe { ptr.as_ptr().write_bytes(0, len) };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        let align = if len >= HUGE { HUGE } else { ALIGN };
        Layout::from_size_align(len, align).unwrap_or_else(|_| panic!("AlignedBuf of {len} bytes is too large"))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_aligned_zeroed_and_rounded_up() {
        for len in [1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::new(len);
            assert_eq!(buf.as_ptr() as usize % ALIGN, 0);
            assert_eq!(buf.len(), len.next_multiple_of(ALIGN));
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn is_writable_end_to_end() {
        let mut buf = AlignedBuf::new(8192);
        buf.fill(0xa5);
        assert_eq!(buf[0], 0xa5);
        assert_eq!(buf[8191], 0xa5);
    }
}
