//! The C allocator's settings for a process that runs forward passes.

/// Threshold above which glibc serves a block by `mmap` and unmaps it when freed, in bytes:
/// glibc's own dynamic maximum on 64-bit (`DEFAULT_MMAP_THRESHOLD_MAX`), from the start.
pub const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// Free memory at the top of glibc's heap above which it is returned to the kernel, in bytes.
pub const TRIM_THRESHOLD_BYTES: i32 = 256 << 20;

/// Keeps the memory one forward pass frees for the next one, instead of handing it back to
/// the kernel and faulting it in, zeroed, again. Returns whether the settings were applied
/// (only with glibc on Linux; elsewhere it does nothing).
///
/// glibc's `malloc` gives the top of its heap back once more than `M_TRIM_THRESHOLD` of it
/// is free, and blocks above `M_MMAP_THRESHOLD` go to `mmap`, each unmapped when freed. A
/// prefill allocates and frees a few MB per layer (matmul outputs, activations), so with the
/// defaults every one of them is page-faulted again: 15-20% of a 512-token Gemma 3 270M
/// prefill on 2 cores (`GLIBC_TUNABLES=glibc.malloc.trim_threshold=...` showed it first). This
/// sets `M_MMAP_THRESHOLD` to [`MMAP_THRESHOLD_BYTES`] and `M_TRIM_THRESHOLD` to
/// [`TRIM_THRESHOLD_BYTES`] (`mallopt(3)`). llama.cpp gets the same effect by allocating its
/// compute buffers once.
///
/// Peak RSS does not change; after a prefill the RSS stays near its peak instead of falling
/// back. Blocks above 32 MB (model weights) are still mapped and unmapped on their own. Call
/// it once, first thing in `main`.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes the arena lock itself.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// glibc accepts both settings (`mallopt` returns 1 on success, 0 for a value out of
    /// range, such as an mmap threshold above `HEAP_MAX_SIZE / 2`).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::keep_freed_memory());
    }
}
