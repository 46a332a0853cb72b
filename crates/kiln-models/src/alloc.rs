//! A global allocator that keeps freed large blocks for reuse.
//!
//! A training step allocates the same large tensors (activations, gradients, logits)
//! every step, and frees them again. The system allocator (glibc) serves blocks below its
//! moving `mmap` threshold from its heap and reuses them, but a block of 32 MiB or more
//! (the qwen2 bench's `[2048, 4096]` logits and their gradient) is a fresh `mmap` every
//! time, so each first write to each 4 KiB page of it faults into the kernel, which zeroes
//! the page. On the CPU backend that doubled the time of the LM head's matmul (59 ms
//! against 27 ms for the same gemm call into reused memory).
//!
//! [`RecyclingAlloc`] hands blocks of [`LARGE`] bytes or more out of a small cache of freed
//! blocks of the same size class (sizes rounded up to a multiple of 64 KiB) and otherwise
//! passes through to [`System`]. Smaller blocks are left to glibc's heap: caching them
//! too was no faster and held more memory (a cache without coalescing keeps freed blocks
//! in the shapes they were freed in). The cache holds at most [`DEFAULT_CACHE_BYTES`] (the
//! environment variable `KILN_ALLOC_CACHE_MB` sets another bound; `0` turns the cache off),
//! and a block unused for [`MAX_IDLE`] is returned to the system at the next large
//! operation, so memory a run stopped using does not stay resident.
//!
//! The `kiln` binary installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: kiln_models::alloc::RecyclingAlloc = kiln_models::alloc::RecyclingAlloc::new();
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Blocks this large or larger go through the cache.
pub const LARGE: usize = 16 << 20;
/// Size classes of large blocks: sizes are rounded up to a multiple of this.
const GRANULE: usize = 64 * 1024;
/// The cache's bound on the bytes it holds, unless `KILN_ALLOC_CACHE_MB` says otherwise.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;
/// A cached block unused this long goes back to the system.
pub const MAX_IDLE: Duration = Duration::from_secs(10);
/// How many freed blocks the cache can hold at once.
const SLOTS: usize = 64;

/// A freed block waiting for reuse.
#[derive(Clone, Copy)]
struct Slot {
    /// Start of the block; 0 for an empty slot.
    ptr: usize,
    /// The block's rounded size.
    size: usize,
    align: usize,
    /// When it was freed.
    freed: Option<Instant>,
}

const EMPTY: Slot = Slot {
    ptr: 0,
    size: 0,
    align: 0,
    freed: None,
};

struct Cache {
    slots: [Slot; SLOTS],
    /// Bytes held in `slots`.
    held: usize,
}

/// See the [module documentation](self).
pub struct RecyclingAlloc {
    cache: Mutex<Cache>,
    /// The cache's bound in bytes; `usize::MAX` until the environment has been read.
    limit: AtomicUsize,
}

impl Default for RecyclingAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl RecyclingAlloc {
    /// An allocator with an empty cache.
    pub const fn new() -> Self {
        Self {
            cache: Mutex::new(Cache {
                slots: [EMPTY; SLOTS],
                held: 0,
            }),
            limit: AtomicUsize::new(usize::MAX),
        }
    }

    /// The bytes the cache holds now (freed blocks kept for reuse).
    pub fn cached_bytes(&self) -> usize {
        self.lock().held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Nothing in the critical sections panics; a poisoned lock still holds valid slots.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache's bound, read from `KILN_ALLOC_CACHE_MB` on first use.
    fn limit(&self) -> usize {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit != usize::MAX {
            return limit;
        }
        // `var_os` and the parse below allocate only small strings, which never reach the
        // cache, so this does not recurse into a large allocation.
        let limit = std::env::var_os("KILN_ALLOC_CACHE_MB")
            .and_then(|v| v.to_str().and_then(|s| s.trim().parse::<usize>().ok()))
            .map_or(DEFAULT_CACHE_BYTES, |mb| mb.saturating_mul(1 << 20))
            .min(usize::MAX - 1);
        self.limit.store(limit, Ordering::Relaxed);
        limit
    }

    /// The layout of the block that serves `layout`: its size rounded up to the size class.
    fn class(layout: Layout) -> Option<Layout> {
        let size = layout.size().checked_add(GRANULE - 1)? / GRANULE * GRANULE;
        Layout::from_size_align(size, layout.align()).ok()
    }

    /// Takes a cached block of `class`, freeing blocks idle for longer than [`MAX_IDLE`].
    fn take(&self, class: Layout) -> Option<*mut u8> {
        let now = Instant::now();
        let mut stale = [EMPTY; 8];
        let mut found = None;
        {
            let mut cache = self.lock();
            let mut n_stale = 0;
            for i in 0..SLOTS {
                let slot = cache.slots[i];
                if slot.ptr == 0 {
                    continue;
                }
                if found.is_none() && slot.size == class.size() && slot.align == class.align() {
                    found = Some(slot.ptr as *mut u8);
                    cache.slots[i] = EMPTY;
                    cache.held -= slot.size;
                } else if n_stale < stale.len()
                    && slot.freed.is_some_and(|t| now.duration_since(t) > MAX_IDLE)
                {
                    stale[n_stale] = slot;
                    n_stale += 1;
                    cache.slots[i] = EMPTY;
                    cache.held -= slot.size;
                }
            }
        }
        for slot in stale.iter().filter(|s| s.ptr != 0) {
            release(slot);
        }
        found
    }

    /// Keeps a freed block for reuse, making room by returning the longest-idle blocks to
    /// the system; returns the block unkept if it alone is over the bound.
    fn keep(&self, ptr: *mut u8, class: Layout) -> bool {
        let limit = self.limit();
        if class.size() > limit {
            return false;
        }
        let mut evicted = [EMPTY; 8];
        let kept = {
            let mut cache = self.lock();
            let mut n_evicted = 0;
            loop {
                let free_slot = cache.slots.iter().position(|s| s.ptr == 0);
                if let Some(i) = free_slot
                    && cache.held + class.size() <= limit
                {
                    cache.slots[i] = Slot {
                        ptr: ptr as usize,
                        size: class.size(),
                        align: class.align(),
                        freed: Some(Instant::now()),
                    };
                    cache.held += class.size();
                    break true;
                }
                if n_evicted == evicted.len() {
                    break false;
                }
                let oldest = cache
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.ptr != 0)
                    .min_by_key(|(_, s)| s.freed)
                    .map(|(i, _)| i);
                let Some(i) = oldest else { break false };
                evicted[n_evicted] = cache.slots[i];
                n_evicted += 1;
                cache.held -= cache.slots[i].size;
                cache.slots[i] = EMPTY;
            }
        };
        for slot in evicted.iter().filter(|s| s.ptr != 0) {
            release(slot);
        }
        kept
    }
}

/// Returns a cached block to the system.
fn release(slot: &Slot) {
    // SAFETY: the slot's block came from `System.alloc` with exactly this size and
    // alignment (its size class), and was removed from the cache, so no one else frees it.
    unsafe {
        System.dealloc(
            slot.ptr as *mut u8,
            Layout::from_size_align_unchecked(slot.size, slot.align),
        )
    }
}

// SAFETY: small blocks go to `System` unchanged. A large block is always allocated from
// `System` with its size-class layout, is handed out to one owner at a time (the cache
// removes it under the lock before returning it), and is freed to `System` with that same
// layout; the size class is a pure function of the caller's layout, so `dealloc` computes
// the same layout that `alloc` used.
unsafe impl GlobalAlloc for RecyclingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: forwarded with the caller's (non-zero-size) layout.
            return unsafe { System.alloc(layout) };
        }
        let Some(class) = Self::class(layout) else {
            return std::ptr::null_mut();
        };
        if let Some(ptr) = self.take(class) {
            return ptr;
        }
        // SAFETY: `class` has a non-zero size.
        unsafe { System.alloc(class) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let Some(class) = Self::class(layout) else {
            return std::ptr::null_mut();
        };
        if let Some(ptr) = self.take(class) {
            // SAFETY: the block is `class.size() >= layout.size()` bytes and ours alone.
            unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
            return ptr;
        }
        // SAFETY: `class` has a non-zero size.
        unsafe { System.alloc_zeroed(class) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE {
            // SAFETY: the block came from `System.alloc` with this layout (see `alloc`).
            return unsafe { System.dealloc(ptr, layout) };
        }
        let class = Self::class(layout).expect("the layout was valid when allocated");
        if !self.keep(ptr, class) {
            // SAFETY: the block came from `System` with its size class (see `alloc`).
            unsafe { System.dealloc(ptr, class) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_large = layout.size() >= LARGE;
        let new_large = new_size >= LARGE;
        if !old_large && !new_large {
            // SAFETY: both sizes are small, so the block is `System`'s with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if old_large && new_large {
            let (old, new) = (Self::class(layout), Self::class(new_layout));
            if let (Some(old), Some(new)) = (old, new) {
                if old.size() == new.size() {
                    return ptr;
                }
                // SAFETY: the block is `System`'s with the layout `old`; growing or
                // shrinking it between large classes keeps it a `System` block of the
                // layout `new`, which is what `dealloc` will compute from `new_size`.
                return unsafe { System.realloc(ptr, old, new.size()) };
            }
            return std::ptr::null_mut();
        }
        // Crossing the threshold: a new block from the other side, copy, free the old.
        // SAFETY: `new_layout` is valid and non-zero-sized; the copy stays within both
        // blocks; the old block is freed with the layout it was allocated with.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    /// The smallest block the cache takes.
    const M: usize = LARGE;

    #[test]
    fn a_freed_large_block_is_reused_for_the_same_size_class() {
        let a = RecyclingAlloc::new();
        // SAFETY: every block is freed once, with the layout it was allocated with.
        unsafe {
            let p = a.alloc(layout(M + 100));
            p.write_bytes(7, M + 100);
            a.dealloc(p, layout(M + 100));
            let class = M + GRANULE;
            assert_eq!(a.cached_bytes(), class);
            // A slightly larger request is the same 64 KiB class.
            let q = a.alloc(layout(M + 200));
            assert_eq!(p, q);
            assert_eq!(a.cached_bytes(), 0);
            // A zeroed request from the cache is zeroed.
            a.dealloc(q, layout(M + 200));
            let z = a.alloc_zeroed(layout(M + 100));
            assert_eq!(z, p);
            assert!(
                std::slice::from_raw_parts(z, M + 100)
                    .iter()
                    .all(|&b| b == 0)
            );
            a.dealloc(z, layout(M + 100));
            // Another class is a fresh block.
            let r = a.alloc(layout(2 * M));
            assert_ne!(r, p);
            a.dealloc(r, layout(2 * M));
            assert_eq!(a.cached_bytes(), class + 2 * M);
            // A small block passes through.
            let small = a.alloc(layout(1000));
            a.dealloc(small, layout(1000));
            assert_eq!(a.cached_bytes(), class + 2 * M);
        }
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let a = RecyclingAlloc::new();
        a.limit.store(3 * M, Ordering::Relaxed);
        // SAFETY: every block is freed once, with the layout it was allocated with.
        unsafe {
            let blocks: Vec<_> = (0..5).map(|_| a.alloc(layout(M))).collect();
            for &p in &blocks {
                a.dealloc(p, layout(M));
                assert!(a.cached_bytes() <= 3 * M);
            }
            assert_eq!(a.cached_bytes(), 3 * M);
            // A block larger than the bound is not kept.
            let big = a.alloc(layout(4 * M));
            a.dealloc(big, layout(4 * M));
            assert_eq!(a.cached_bytes(), 3 * M);
        }
    }

    #[test]
    fn realloc_keeps_contents_across_the_threshold() {
        let a = RecyclingAlloc::new();
        // SAFETY: each block is used within its size and freed once with its layout.
        unsafe {
            let p = a.alloc(layout(1000));
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            let q = a.realloc(p, layout(1000), 3 * M);
            let r = a.realloc(q, layout(3 * M), 5 * M);
            let s = a.realloc(r, layout(5 * M), 500);
            for i in 0..500 {
                assert_eq!(*s.add(i), i as u8);
            }
            a.dealloc(s, layout(500));
        }
    }
}
