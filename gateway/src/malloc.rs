//! glibc malloc settings for the long-running gateway, applied in-process so
//! that the footprint does not depend on how it is started (systemd unit,
//! container, a shell).
//!
//! - One arena: memory freed after start-up (the config parse, up to tens of
//!   MB for 100,000 tags) is reused by the running threads instead of each
//!   worker thread growing an arena of its own.
//! - A fixed 1 MiB mmap threshold: large blocks (per-poll sample vectors,
//!   batches) are mapped apart and returned to the system when freed; glibc
//!   would otherwise raise the threshold dynamically and keep them.
//!
//! - After start-up, `trim` hands back the free pages that the config parse
//!   left between live allocations (the heap's top cannot shrink past them).
//!
//! Measured at 100,000 points/s (BENCHMARKS.md): RSS 85 MiB with glibc's
//! defaults, 46 MiB with these. An operator's own `MALLOC_ARENA_MAX` or
//! `MALLOC_MMAP_THRESHOLD_` wins: the setting it names is left alone.
//! Must run before any thread is started. A no-op off glibc.

/// Applies the settings above; call first thing in `main`.
#[allow(unsafe_code)]
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before
        // other threads exist.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        }
    }
}

/// Returns free heap pages to the system (glibc `malloc_trim`); call once
/// start-up's transient allocations are freed. A no-op off glibc.
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory back to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
