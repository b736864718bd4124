//! [`AlignedBuf`]: a byte buffer aligned to 4096 bytes, as `O_DIRECT` writes require.

use std::alloc::{dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of buffers, offsets and lengths for direct I/O.
pub const ALIGN: usize = 4096;

/// A heap buffer whose start is aligned to [`ALIGN`]; its length can change up to its
/// capacity, and grows (reallocating) beyond it. Contents are zeroed when allocated.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub fn new() -> AlignedBuf {
        AlignedBuf {
            ptr: NonNull::dangling(),
            len: 0,
            cap: 0,
        }
    }

    /// Sets the length to `len`, reallocating (zeroed) if the capacity is smaller.
    pub fn resize(&mut self, len: usize) {
        if len > self.cap {
            let cap = len.next_multiple_of(ALIGN);
            let layout = Layout::from_size_align(cap, ALIGN).expect("chunk sizes are bounded");
            // SAFETY: `cap` is non-zero (len > cap >= 0 so len >= 1) and the layout is valid.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            let Some(ptr) = NonNull::new(ptr) else {
                std::alloc::handle_alloc_error(layout);
            };
            self.free();
            self.ptr = ptr;
            self.cap = cap;
        }
        self.len = len;
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in `resize` with exactly this layout.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            };
            self.cap = 0;
            self.len = 0;
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised (zeroed) bytes, or dangling with
        // len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_resizable() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        b.resize(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b[4999] = 7;
        b.resize(100);
        assert_eq!(b.len(), 100);
        b.resize(1 << 20);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().take(10).all(|&x| x == 0));
    }
}
