//! The seeded random number generator of the workspace: [`SplitMix64`], with the few
//! distributions its callers draw (uniform floats, normals, indexes). Its output sequence is
//! fixed and platform-independent, so seeded tests and synthetic data keep their values.

/// The SplitMix64 generator (Steele, Lea and Flood 2014, as in Java's `SplittableRandom`): a
/// 64-bit state advanced by a fixed odd constant and mixed on output. Small and well mixed;
/// not cryptographic.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose state starts at `seed` (the first output mixes `seed + γ`).
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 24 bits of [`next_u64`](Self::next_u64), exact in `f32`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-1, 1): the top 24 bits of [`next_u64`](Self::next_u64) scaled by 2⁻²³,
    /// minus one (equal to `2 * next_f32() - 1` for the same draw).
    pub fn next_signed_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in (0, 1]: the top 53 bits of [`next_u64`](Self::next_u64), plus one, scaled
    /// by 2⁻⁵³ (never 0, so its logarithm is finite).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Standard normal, by Box-Muller from two [`uniform`](Self::uniform) draws.
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Uniform in `0..n` (by modulo, so very slightly biased for huge `n`).
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_0_gives_the_published_reference_values() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(r.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn floats_are_in_range_and_follow_the_bits() {
        let (mut a, mut b, mut c) = (SplitMix64::new(9), SplitMix64::new(9), SplitMix64::new(9));
        for _ in 0..1000 {
            let bits = a.next_u64();
            let x = b.next_f32();
            let y = c.next_signed_f32();
            assert!((0.0..1.0).contains(&x) && (-1.0..1.0).contains(&y));
            assert_eq!(x, (bits >> 40) as f32 / 16_777_216.0);
            assert_eq!(y, 2.0 * x - 1.0);
        }
        let mut r = SplitMix64::new(3);
        for _ in 0..1000 {
            let u = r.uniform();
            assert!(u > 0.0 && u <= 1.0);
            assert!(r.below(7) < 7);
            assert!(r.normal().is_finite());
        }
    }

    #[test]
    fn normals_have_mean_0_and_variance_1() {
        let mut r = SplitMix64::new(1);
        let n = 20_000;
        let v: Vec<f64> = (0..n).map(|_| f64::from(r.normal())).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
