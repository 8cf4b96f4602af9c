//! Seeded synthetic data for tests and benchmarks: clustered unit vectors.
//!
//! Deterministic across platforms (splitmix64 + Box-Muller); no `rand` dependency.

/// The workspace's seeded generator (re-exported for the callers of this module).
pub use ragtune_util::rng::SplitMix64;

/// Scales `v` to unit L2 norm (left as is when zero).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Latent dimension of the within-cluster variation in [`clustered`].
pub const LATENT_DIM: usize = 16;

/// `n` unit vectors of dimension `dim` (row-major, `n * dim` f32) drawn around `centres`
/// random unit centres. Like real sentence embeddings, the variation has low intrinsic
/// dimension: each point is `centre + spread * B z + 0.1 * spread * e`, with `B` a fixed
/// random `dim x LATENT_DIM` map (unit-variance columns), `z` and `e` standard normal, and the
/// result L2-normalised.
pub fn clustered(n: usize, dim: usize, centres: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    // The basis comes from a fixed seed so that different `seed`s share the same manifold.
    let mut brng = SplitMix64::new(0x5eed_ba5e ^ dim as u64);
    let basis: Vec<f32> = (0..dim * LATENT_DIM).map(|_| brng.normal()).collect();
    let mut crng = SplitMix64::new(0xc3c3 ^ centres as u64 ^ ((dim as u64) << 32));
    let mut cs = vec![0f32; centres.max(1) * dim];
    for c in cs.chunks_exact_mut(dim) {
        c.iter_mut().for_each(|x| *x = crng.normal());
        normalize(c);
    }
    let mut out = vec![0f32; n * dim];
    let mut z = [0f32; LATENT_DIM];
    let scale = spread / (dim as f32).sqrt() * 4.0;
    for row in out.chunks_exact_mut(dim) {
        let c = rng.below(centres.max(1));
        let centre = &cs[c * dim..(c + 1) * dim];
        z.iter_mut().for_each(|x| *x = rng.normal());
        for (j, (x, m)) in row.iter_mut().zip(centre).enumerate() {
            let b = &basis[j * LATENT_DIM..(j + 1) * LATENT_DIM];
            let latent: f32 = b.iter().zip(&z).map(|(p, q)| p * q).sum();
            *x = m + scale * latent + 0.1 * spread * rng.normal();
        }
        normalize(row);
    }
    out
}
