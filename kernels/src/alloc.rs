//! [`LineAligned`], the allocator a process running the CPU kernels installs: the
//! C allocator for small blocks, whole pages of their own for large ones.
//!
//! The kernels read rows of factor matrices at random: an ALS half-step gathers
//! the other side's rows, a k-means pass the centroids. A row of 32 factors is
//! 128 bytes, two cache lines when it starts on a line and three when it does
//! not, and `malloc` puts a large block 16 bytes past a page boundary (behind its
//! header), so every such row would straddle three. A block of at least [`LARGE`]
//! bytes is therefore mapped on its own pages (`mmap`; `mremap` to grow or shrink
//! it, `munmap` to free it), as `malloc` does for large blocks but without the
//! header: it starts on a page, and every row of it on a line. On the ALS
//! benchmark at 1M users the item half-step, which gathers user rows from a
//! 128 MB matrix, took 0.39 s on `malloc`'s blocks and 0.25 s on lines (with the
//! gather's far prefetch; `BENCHMARKS.md`).

use std::alloc::{GlobalAlloc, Layout};

/// Blocks at least this large (bytes) are mapped on pages of their own: the
/// size from which glibc's `malloc` always maps a block itself (its largest
/// dynamic threshold), so that memory is returned and reused as on `malloc`.
/// Mapping smaller blocks too (from 1 MiB) took a third less memory on the 1M-user
/// job but made it ~20 % slower: every large buffer came as fresh pages.
pub const LARGE: usize = 32 << 20;
/// The alignment a mapped block has (a page), and the most it may be asked for.
const PAGE: usize = 4096;
/// The alignment `malloc` gives every block on the 64-bit targets shoal builds for.
const MALLOC_ALIGN: usize = 16;

/// The C allocator (`malloc`) for blocks under [`LARGE`] bytes, pages of their
/// own for larger ones (which therefore start on a page, and a cache line).
/// Install it with `#[global_allocator]` in a binary.
pub struct LineAligned;

/// Whether a block of `layout` is mapped on pages of its own. It depends only on
/// the layout, which the caller repeats on `dealloc` and `realloc`.
fn mapped(layout: Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= PAGE
}

/// `len` bytes of zeroed pages of their own, or null.
///
/// # Safety
/// `len` is non-zero.
unsafe fn map(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address of the kernel's choice.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

/// A block from the C allocator for a layout that is not [`mapped`], or null.
///
/// # Safety
/// `layout` has a non-zero size.
unsafe fn c_alloc(layout: Layout) -> *mut u8 {
    if layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size() {
        // SAFETY: a plain C allocation of a non-zero size.
        return unsafe { libc::malloc(layout.size()) }.cast();
    }
    let mut out = std::ptr::null_mut();
    let align = layout.align().max(std::mem::size_of::<usize>());
    // SAFETY: `align` is a power of two and a multiple of the pointer size.
    match unsafe { libc::posix_memalign(&mut out, align, layout.size()) } {
        0 => out.cast(),
        _ => std::ptr::null_mut(),
    }
}

// SAFETY: a block of a `mapped` layout is a mapping of exactly its size made by
// `map` or `mremap` (page-aligned, so aligned for any alignment up to a page),
// freed with `munmap` of that size; any other block comes from `malloc` or
// `posix_memalign` (aligned as asked) and goes back through `free` or `realloc`.
// Whether a block is mapped depends only on the layout its caller holds, which
// the caller repeats when it frees or resizes the block; a resize that changes it
// moves the bytes into a block of the other kind.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the size is non-zero (the caller's promise).
        unsafe {
            if mapped(layout) {
                map(layout.size())
            } else {
                c_alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            // SAFETY: as in `alloc`; fresh anonymous pages read as zeros.
            return unsafe { map(layout.size()) };
        }
        // SAFETY: as in `alloc`; the block holds `layout.size()` bytes.
        unsafe {
            let p = c_alloc(layout);
            if !p.is_null() {
                p.write_bytes(0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: a mapped block is a mapping of `layout.size()` bytes at `ptr`;
        // any other came from the C allocator (see the impl).
        unsafe {
            if mapped(layout) {
                libc::munmap(ptr.cast(), layout.size());
            } else {
                libc::free(ptr.cast());
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The caller promises that `new_size`, rounded up to `layout.align()`,
        // does not overflow isize: this is a valid layout.
        let Ok(asked) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (mapped(layout), mapped(asked)) {
            (true, true) => {
                // SAFETY: `ptr` is a mapping of `layout.size()` bytes; the kernel
                // moves its pages (keeping their contents) where they fit.
                let p = unsafe {
                    libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE)
                };
                if p == libc::MAP_FAILED {
                    std::ptr::null_mut()
                } else {
                    p.cast()
                }
            }
            (false, false) if layout.align() <= MALLOC_ALIGN && layout.align() <= new_size => {
                // SAFETY: `ptr` came from the C allocator; `new_size` is non-zero.
                unsafe { libc::realloc(ptr.cast(), new_size) }.cast()
            }
            _ => {
                // Across kinds (or over-aligned): a new block, the bytes both
                // hold, the old one freed. On failure the old block stays.
                // SAFETY: `asked` is a valid non-zero layout; both blocks hold at
                // least min(old, new) bytes and are distinct; `ptr` is a block
                // of `layout`.
                unsafe {
                    let moved = self.alloc(asked);
                    if !moved.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' own tests run on the allocator the product installs.
    #[global_allocator]
    static ALLOCATOR: LineAligned = LineAligned;

    fn on_a_page<T>(v: &[T]) -> bool {
        (v.as_ptr() as usize).is_multiple_of(PAGE)
    }

    #[test]
    fn large_blocks_start_on_a_page_and_read_as_written() {
        for len in [LARGE / 4, (8 << 20) + 3] {
            let zeros = vec![0f32; len];
            assert!(on_a_page(&zeros), "{len} floats at {:p}", zeros.as_ptr());
            assert!(zeros.iter().all(|&x| x == 0.0));
            let v = vec![1.5f32; len];
            assert!(on_a_page(&v), "{len} floats at {:p}", v.as_ptr());
            assert!(v.iter().all(|&x| x == 1.5));
        }
        let small: Vec<u8> = (0..100).collect();
        assert_eq!(small[99], 99);
    }

    #[test]
    fn growing_and_shrinking_across_the_threshold_keeps_the_values() {
        let mut v: Vec<u32> = Vec::new();
        for i in 0..(LARGE as u32) {
            v.push(i);
            if v.capacity() * 4 >= LARGE {
                assert!(on_a_page(&v), "{} values at {:p}", v.len(), v.as_ptr());
            }
        }
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        v.truncate(LARGE / 8);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
        v.truncate(100);
        v.shrink_to_fit();
        assert_eq!(v, (0..100).collect::<Vec<u32>>());
        let mut z = vec![0u8; LARGE - 1];
        z.push(7);
        assert!(on_a_page(&z));
        assert_eq!((z.len(), z[LARGE - 1], z[0]), (LARGE, 7, 0));
    }

    #[test]
    fn alignments_over_a_page_are_kept() {
        let layout = Layout::from_size_align(LARGE * 2, 2 * PAGE).unwrap();
        // SAFETY: a valid non-zero layout; the block is resized and freed with
        // the layouts it has.
        unsafe {
            let p = LineAligned.alloc(layout);
            assert!(!p.is_null() && (p as usize).is_multiple_of(2 * PAGE));
            p.write_bytes(3, layout.size());
            let q = LineAligned.realloc(p, layout, LARGE * 4);
            assert!(!q.is_null() && (q as usize).is_multiple_of(2 * PAGE));
            assert_eq!(*q.add(LARGE * 2 - 1), 3);
            LineAligned.dealloc(q, Layout::from_size_align(LARGE * 4, 2 * PAGE).unwrap());
        }
    }
}
