//! Allocator settings of the binaries (`lora-compose`, `cpu-peer`), which use mimalloc as their
//! global allocator.
//!
//! A training step allocates its activations afresh and frees them at the end; a step takes
//! 10–100 ms. mimalloc by default *purges* freed memory after a delay (gives the pages back to
//! the kernel), so steps faulted the same pages back in and the kernel cleared them:
//! `clear_page_erms` was 24% of a tiny-ViT step's samples under perf (`cpu-peer vit-step`,
//! 5,459 page faults in 25 steps). With purging off, 383 faults. The memory kept is the peak
//! of one step, which the process needs again at the next.

/// mimalloc's `mi_option_purge_delay`: the 16th entry of `mi_option_e` in `mimalloc.h` (the v3
/// series libmimalloc-sys builds by default, and v2 alike); libmimalloc-sys names no constant
/// for it. The test below checks the index by the option's default in v3, 1000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never give freed pages back to the kernel (mimalloc `purge_delay = -1`). Call it first thing
/// in `main`; it affects only mimalloc, and does nothing harmful under another allocator.
pub fn keep_freed_pages() {
    // SAFETY: sets one integer option; mimalloc reads options at any time, thread-safely.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is right: its default is purge_delay's 1000 ms (v3's `options.c`; the
    /// entries beside it default to 0 or 1), and setting it sticks.
    #[test]
    fn purge_delay_option_index() {
        // SAFETY: reads / writes one integer option.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            keep_freed_pages();
            assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), -1);
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        }
    }
}
