//! A cache hint shared by the shuffles and batch assembly.

/// Asks the CPU to start loading the cache line holding `items[i]` without waiting for it, so
/// that a later access finds it in cache. Only a hint: nothing happens past the end of `items`
/// or on other architectures.
///
/// Unlike a plain load, a prefetch does not hold up the instructions after it until the data
/// arrives, so it can run far enough ahead to hide a cache miss behind other work.
#[inline(always)]
pub fn prefetch<T>(items: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(item) = items.get(i) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch of a valid address (a
        // reference) has no effect the program can observe besides timing.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(item).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (items, i);
}
