//! Small mechanisms shared by the ragtune crates, each written once:
//!
//! - [`cpu`]: [`SimdLevel`](cpu::SimdLevel), the SIMD kernel level chosen at run time from
//!   the CPU's instruction sets.
//! - [`math`]: [`fast_exp`](math::fast_exp), a vectorisable `e^x`.
//! - [`fs`]: atomic file replacement (temporary file, fsync, rename, fsync of the directory).
//! - [`rng`]: [`SplitMix64`](rng::SplitMix64), a tiny seedable generator with a fixed,
//!   platform-independent output sequence.
//! - [`ptr`]: [`SyncPtr`](ptr::SyncPtr), an `f32` buffer pointer that parallel tasks share to
//!   write disjoint parts of one buffer.
//!
//! The crate has no dependencies and returns plain [`std::io::Error`]s; callers map them into
//! their own error types with the path involved.

#![warn(missing_docs)]

pub mod alloc;
pub mod cpu;
pub mod fs;
pub mod math;
pub mod ptr;
pub mod rng;
