//! Which SIMD kernels this process runs: the CPU's instruction sets, detected once at run
//! time (`is_x86_feature_detected!`), so one release binary runs on any x86-64 CPU and uses
//! the widest kernels the CPU has.
//!
//! The environment variable `RAGTUNE_SIMD` (`portable`, `avx2` or `avx512`) lowers the level
//! for the whole process: to compare kernels, or to rule them out when a result looks wrong.
//! It never raises the level above what the CPU has; an unknown value is ignored.

use std::sync::OnceLock;

/// A kernel level, from the narrowest to the widest. Each level includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 + FMA + F16C (x86-64-v3, every x86-64 server CPU since about 2015).
    Avx2,
    /// [`Avx2`](Self::Avx2) plus AVX-512 F, BW, VL and VNNI (Intel Ice Lake, AMD Zen 4 and
    /// later): 512-bit registers and the `vpdpbusd` u8 × i8 dot-product instruction.
    Avx512,
}

impl SimdLevel {
    /// Every level, narrowest first.
    pub const ALL: [Self; 3] = [Self::Portable, Self::Avx2, Self::Avx512];

    /// The name `RAGTUNE_SIMD` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The level named `name` (as [`name`](Self::name) writes it), `None` for another name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name.trim())
    }

    /// The widest level this CPU has (ignoring `RAGTUNE_SIMD`), detected once.
    pub fn detected() -> Self {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(detect)
    }

    /// The level the kernels use: [`detected`](Self::detected), lowered by `RAGTUNE_SIMD`
    /// when it names a narrower level. Read once per process.
    pub fn active() -> Self {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let detected = Self::detected();
            std::env::var("RAGTUNE_SIMD")
                .ok()
                .and_then(|v| Self::parse(&v))
                .map_or(detected, |wanted| wanted.min(detected))
        })
    }

    /// The levels this CPU can run, narrowest first: what the tests compare against each
    /// other.
    pub fn supported() -> Vec<Self> {
        let detected = Self::detected();
        Self::ALL.into_iter().filter(|l| *l <= detected).collect()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    match (avx2, avx512) {
        (true, true) => SimdLevel::Avx512,
        (true, false) => SimdLevel::Avx2,
        _ => SimdLevel::Portable,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_levels_are_ordered() {
        for level in SimdLevel::ALL {
            assert_eq!(SimdLevel::parse(level.name()), Some(level));
        }
        assert_eq!(SimdLevel::parse("sse9"), None);
        assert!(SimdLevel::Portable < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        let supported = SimdLevel::supported();
        assert_eq!(supported[0], SimdLevel::Portable);
        assert_eq!(supported.last().copied(), Some(SimdLevel::detected()));
        assert!(SimdLevel::active() <= SimdLevel::detected());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_detected_level_matches_the_cpu_flags() {
        let level = SimdLevel::detected();
        assert_eq!(
            level >= SimdLevel::Avx2,
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        );
        if level == SimdLevel::Avx512 {
            assert!(is_x86_feature_detected!("avx512vnni"));
        }
    }
}
