//! The HNSW graph: built with `hnsw_rs`, then frozen into a compact fixed-stride layout that
//! we serialise, memory-map and search with our own loop.
//!
//! Graph payload layout (after the 64-byte header; all integers little-endian u32):
//!
//! ```text
//! n, m, max_level, entry, n_blocks, reserved(0)
//! levels:       u8[n], zero-padded to a multiple of 4 bytes
//! upper_offset: u32[n]                     first upper block of point i (u32::MAX if level 0)
//! layer0:       u32[n * (1 + 2m)]          per point: count, then 2m ids (u32::MAX padding)
//! upper:        u32[n_blocks * (1 + m)]    per block: count, then m ids; point i at layer
//!                                          l >= 1 uses block upper_offset[i] + l - 1
//! ```

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use crate::directory::FileBytes;
use crate::error::{Error, Result};
use crate::format::{cast_slice, read_u32, HEADER_LEN};
use crate::simd;
use crate::HnswParams;

/// Highest layer hnsw_rs may use.
const MAX_LAYER: usize = 16;
const NONE: u32 = u32::MAX;
const FIXED_WORDS: usize = 6;

/// `1 - dot`, clamped at 0, for hnsw_rs (its stock `DistDot` asserts on near-duplicates).
struct DotDistance;

impl anndists::dist::Distance<f32> for DotDistance {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - simd::dot(va, vb)).max(0.0)
    }
}

/// A graph held in memory in the frozen layout, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenGraph {
    m: usize,
    max_level: u32,
    entry: u32,
    levels: Vec<u8>,
    upper_offset: Vec<u32>,
    layer0: Vec<u32>,
    upper: Vec<u32>,
}

fn fill_list(dst: &mut [u32], ids: &[u32]) {
    let cap = dst.len() - 1;
    let n = ids.len().min(cap);
    dst[0] = n as u32;
    dst[1..1 + n].copy_from_slice(&ids[..n]);
    for x in &mut dst[1 + n..] {
        *x = NONE;
    }
}

/// Builds a graph over `vectors` (n x dim, row-major, L2-normalised) with hnsw_rs and freezes it.
///
/// # Errors
/// [`Error::InvalidParameter`] for parameters hnsw_rs cannot take (m outside 2..=255).
pub fn build(
    vectors: &[f32],
    dim: usize,
    params: &HnswParams,
    threads: usize,
) -> Result<FrozenGraph> {
    params.validate()?;
    let n = vectors.len().checked_div(dim).unwrap_or(0);
    let m = params.m;
    if n == 0 {
        return Ok(FrozenGraph {
            m,
            max_level: 0,
            entry: NONE,
            levels: Vec::new(),
            upper_offset: Vec::new(),
            layer0: Vec::new(),
            upper: Vec::new(),
        });
    }
    let hnsw = hnsw_rs::hnsw::Hnsw::<f32, DotDistance>::new(
        m,
        n,
        MAX_LAYER,
        params.ef_construction.max(m),
        DotDistance,
    );
    let rows: Vec<(&[f32], usize)> = vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| (v, i))
        .collect();
    // The first points go in serially: hnsw_rs races when the first two inserts overlap.
    let serial = rows.len().min(64);
    for &r in &rows[..serial] {
        hnsw.insert_slice(r);
    }
    if rows.len() > serial {
        let rest: Vec<(&[f32], usize)> = rows[serial..].to_vec();
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
        {
            Ok(pool) => pool.install(|| hnsw.parallel_insert_slice(&rest)),
            Err(_) => rest.iter().for_each(|&r| hnsw.insert_slice(r)),
        }
    }

    // Read the graph out.
    let pi = hnsw.get_point_indexation();
    let max_level = u32::from(hnsw.get_max_level_observed());
    let mut levels = vec![0u8; n];
    let mut neigh: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
    let mut entry = NONE;
    for l in 0..=max_level as usize {
        for p in pi.get_layer_iterator(l) {
            let id = p.get_origin_id();
            if id >= n {
                continue;
            }
            let level = p.get_point_id().0;
            levels[id] = level;
            if l == max_level as usize && entry == NONE {
                entry = id as u32;
            }
            let nh = p.get_neighborhood_id();
            let mut per_layer = Vec::with_capacity(level as usize + 1);
            for (layer, list) in nh.iter().enumerate().take(level as usize + 1) {
                let cap = if layer == 0 { 2 * m } else { m };
                let mut ids: Vec<u32> = Vec::with_capacity(cap);
                for nb in list {
                    let d = nb.d_id;
                    if d < n && d != id && !ids.contains(&(d as u32)) && ids.len() < cap {
                        ids.push(d as u32);
                    }
                }
                per_layer.push(ids);
            }
            neigh[id] = per_layer;
        }
    }
    drop(hnsw);
    if entry == NONE {
        entry = 0;
    }
    let s0 = 1 + 2 * m;
    let su = 1 + m;
    let mut layer0 = vec![NONE; n * s0];
    let mut upper_offset = vec![NONE; n];
    let mut n_blocks = 0usize;
    for i in 0..n {
        if levels[i] > 0 {
            upper_offset[i] = n_blocks as u32;
            n_blocks += levels[i] as usize;
        }
    }
    let mut upper = vec![NONE; n_blocks * su];
    for i in 0..n {
        let empty = Vec::new();
        let lists = &neigh[i];
        fill_list(
            &mut layer0[i * s0..(i + 1) * s0],
            lists.first().unwrap_or(&empty),
        );
        for l in 1..=levels[i] as usize {
            let b = upper_offset[i] as usize + l - 1;
            fill_list(
                &mut upper[b * su..(b + 1) * su],
                lists.get(l).unwrap_or(&empty),
            );
        }
    }
    Ok(FrozenGraph {
        m,
        max_level,
        entry,
        levels,
        upper_offset,
        layer0,
        upper,
    })
}

impl FrozenGraph {
    /// Serialises the payload.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.levels.len();
        let n_blocks = self.upper.len() / (1 + self.m);
        let mut out =
            Vec::with_capacity(24 + n + 4 * (n + self.layer0.len() + self.upper.len()) + 4);
        for w in [
            n as u32,
            self.m as u32,
            self.max_level,
            self.entry,
            n_blocks as u32,
            0,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.levels);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        for w in self
            .upper_offset
            .iter()
            .chain(&self.layer0)
            .chain(&self.upper)
        {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// A frozen graph viewed in place over its (memory-mapped) file.
#[derive(Debug, Clone)]
pub struct GraphView {
    bytes: FileBytes,
    path: PathBuf,
    n: usize,
    m: usize,
    max_level: usize,
    entry: u32,
    levels_at: usize,
    upper_off_at: usize,
    l0_at: usize,
    upper_at: usize,
    end: usize,
}

struct Slices<'a> {
    levels: &'a [u8],
    upper_off: &'a [u32],
    l0: &'a [u32],
    upper: &'a [u32],
}

impl GraphView {
    /// Opens a verified graph file and validates its structure (ids in range, counts in bounds).
    ///
    /// # Errors
    /// [`Error::DataCorruption`] naming `path`.
    pub fn open(
        bytes: FileBytes,
        path: &Path,
        expected_n: usize,
        expected_m: usize,
    ) -> Result<GraphView> {
        let p = &bytes[HEADER_LEN..];
        if p.len() < FIXED_WORDS * 4 {
            return Err(Error::corrupt(path, "graph payload too short"));
        }
        let n = read_u32(p, 0) as usize;
        let m = read_u32(p, 4) as usize;
        let max_level = read_u32(p, 8) as usize;
        let entry = read_u32(p, 12);
        let n_blocks = read_u32(p, 16) as usize;
        if n != expected_n || m != expected_m {
            return Err(Error::corrupt(
                path,
                format!("graph has n={n}, m={m}; expected n={expected_n}, m={expected_m}"),
            ));
        }
        if max_level >= MAX_LAYER || (n > 0 && entry as usize >= n) || m == 0 {
            return Err(Error::corrupt(path, "graph header fields out of range"));
        }
        let levels_at = HEADER_LEN + FIXED_WORDS * 4;
        let upper_off_at = levels_at + n.div_ceil(4) * 4;
        let l0_at = upper_off_at + 4 * n;
        let upper_at = l0_at + 4 * n * (1 + 2 * m);
        let end = upper_at + 4 * n_blocks * (1 + m);
        if end != bytes.len() {
            return Err(Error::corrupt(
                path,
                "graph payload length does not match its counts",
            ));
        }
        let g = GraphView {
            bytes,
            path: path.to_path_buf(),
            n,
            m,
            max_level,
            entry,
            levels_at,
            upper_off_at,
            l0_at,
            upper_at,
            end,
        };
        g.validate(n_blocks)?;
        Ok(g)
    }

    fn slices(&self) -> Result<Slices<'_>> {
        Ok(Slices {
            levels: &self.bytes[self.levels_at..self.levels_at + self.n],
            upper_off: cast_slice(
                &self.bytes[self.upper_off_at..self.l0_at],
                &self.path,
                "graph offsets",
            )?,
            l0: cast_slice(
                &self.bytes[self.l0_at..self.upper_at],
                &self.path,
                "graph layer 0",
            )?,
            upper: cast_slice(
                &self.bytes[self.upper_at..self.end],
                &self.path,
                "graph upper layers",
            )?,
        })
    }

    fn validate(&self, n_blocks: usize) -> Result<()> {
        let s = self.slices()?;
        let n = self.n as u32;
        let bad = |what: &str| {
            Err(Error::corrupt(
                &self.path,
                format!("graph structure invalid: {what}"),
            ))
        };
        let check_list = |list: &[u32]| -> bool {
            let c = list[0] as usize;
            c < list.len() && list[1..1 + c].iter().all(|&x| x < n)
        };
        if self.n > 0 && s.levels[self.entry as usize] as usize != self.max_level {
            return bad("entry point is not on the top layer");
        }
        let mut next_block = 0usize;
        for i in 0..self.n {
            let lv = s.levels[i] as usize;
            if lv > self.max_level {
                return bad("point level above max level");
            }
            if lv == 0 {
                if s.upper_off[i] != NONE {
                    return bad("level-0 point has upper blocks");
                }
            } else {
                if s.upper_off[i] as usize != next_block {
                    return bad("upper block offsets are not contiguous");
                }
                next_block += lv;
            }
        }
        if next_block != n_blocks {
            return bad("upper block count mismatch");
        }
        let s0 = 1 + 2 * self.m;
        if !s.l0.chunks_exact(s0).all(check_list) {
            return bad("layer-0 neighbour list out of range");
        }
        if !s.upper.chunks_exact(1 + self.m).all(check_list) {
            return bad("upper-layer neighbour list out of range");
        }
        Ok(())
    }

    /// Top-`ef` approximate search: returns up to `ef` `(score, row)` pairs, best first, of rows
    /// accepted by `accept` (rows rejected are still traversed).
    pub fn search(
        &self,
        vectors: &[f32],
        dim: usize,
        query: &[f32],
        ef: usize,
        accept: &dyn Fn(u32) -> bool,
        all_accepted: bool,
    ) -> Result<Vec<(f32, u32)>> {
        if self.n == 0 || ef == 0 {
            return Ok(Vec::new());
        }
        let s = self.slices()?;
        if vectors.len() < self.n * dim || query.len() != dim {
            return Err(Error::corrupt(
                &self.path,
                "graph and vectors disagree on row count",
            ));
        }
        let ctx = Ctx {
            s: &s,
            vectors,
            dim,
            query,
            m: self.m,
            n: self.n,
            entry: self.entry,
            max_level: self.max_level,
        };
        let out = SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => run_search(&ctx, &mut scratch, ef, accept, all_accepted),
            Err(_) => run_search(&ctx, &mut Scratch::default(), ef, accept, all_accepted),
        });
        Ok(out)
    }
}

struct Ctx<'a> {
    s: &'a Slices<'a>,
    vectors: &'a [f32],
    dim: usize,
    query: &'a [f32],
    m: usize,
    n: usize,
    entry: u32,
    max_level: usize,
}

/// A score with a total order (NaN sorts lowest via `total_cmp`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scored(f32, u32);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// Per-thread reusable search state: visited stamps and heaps.
#[derive(Default)]
struct Scratch {
    stamps: Vec<u32>,
    gen: u32,
    cand: BinaryHeap<Scored>,
    res: BinaryHeap<Reverse<Scored>>,
}

impl Scratch {
    fn begin(&mut self, n: usize) {
        if self.stamps.len() < n {
            self.stamps.resize(n, 0);
        }
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.stamps.iter_mut().for_each(|x| *x = 0);
            self.gen = 1;
        }
        self.cand.clear();
        self.res.clear();
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

trait Kernel {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}
struct ScalarK;
impl Kernel for ScalarK {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        simd::dot_scalar(a, b)
    }
}
#[cfg(target_arch = "x86_64")]
struct Avx2K;
#[cfg(target_arch = "x86_64")]
impl Kernel for Avx2K {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only instantiated by `search_avx2`, which is reached after run-time detection.
        unsafe { simd::dot_avx2(a, b) }
    }
}

fn run_search(
    ctx: &Ctx<'_>,
    scratch: &mut Scratch,
    ef: usize,
    accept: &dyn Fn(u32) -> bool,
    all: bool,
) -> Vec<(f32, u32)> {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { search_avx2(ctx, scratch, ef, accept, all) };
    }
    search_generic::<ScalarK>(ctx, scratch, ef, accept, all)
}

// The same parameters as `run_search` on purpose: a `#[target_feature]` trampoline, so that
// `search_generic::<Avx2K>` is compiled (inlined) with AVX2 and FMA enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn search_avx2(
    ctx: &Ctx<'_>,
    scratch: &mut Scratch,
    ef: usize,
    accept: &dyn Fn(u32) -> bool,
    all: bool,
) -> Vec<(f32, u32)> {
    search_generic::<Avx2K>(ctx, scratch, ef, accept, all)
}

#[inline(always)]
fn search_generic<K: Kernel>(
    ctx: &Ctx<'_>,
    scratch: &mut Scratch,
    ef: usize,
    accept: &dyn Fn(u32) -> bool,
    all: bool,
) -> Vec<(f32, u32)> {
    let dim = ctx.dim;
    let q = ctx.query;
    let vec_of = |i: u32| -> &[f32] {
        let a = i as usize * dim;
        &ctx.vectors[a..a + dim]
    };
    let lines = (dim * 4).div_ceil(64);
    // Greedy descent through the upper layers.
    let mut ep = ctx.entry;
    let mut ep_s = K::dot(q, vec_of(ep));
    let su = 1 + ctx.m;
    for l in (1..=ctx.max_level).rev() {
        loop {
            let mut changed = false;
            let lv = ctx.s.levels[ep as usize] as usize;
            if lv < l {
                break;
            }
            let b = ctx.s.upper_off[ep as usize] as usize + l - 1;
            let list = &ctx.s.upper[b * su..(b + 1) * su];
            let c = list[0] as usize;
            for &nb in &list[1..1 + c] {
                let s = K::dot(q, vec_of(nb));
                if s > ep_s {
                    ep_s = s;
                    ep = nb;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    // Best-first search on layer 0.
    scratch.begin(ctx.n);
    let gen = scratch.gen;
    let Scratch {
        stamps, cand, res, ..
    } = scratch;
    let s0 = 1 + 2 * ctx.m;
    stamps[ep as usize] = gen;
    cand.push(Scored(ep_s, ep));
    let mut lower = f32::NEG_INFINITY;
    if all || accept(ep) {
        res.push(Reverse(Scored(ep_s, ep)));
        if res.len() >= ef {
            lower = ep_s;
        }
    }
    while let Some(Scored(cs, c)) = cand.pop() {
        if cs < lower {
            break;
        }
        let list = &ctx.s.l0[c as usize * s0..(c as usize + 1) * s0];
        let cnt = (list[0] as usize).min(s0 - 1);
        // Gather the unvisited neighbours first and prefetch their vectors, so the loads
        // overlap with the dot products below.
        let mut fresh = [0u32; 512];
        let mut nf = 0usize;
        for &nb in &list[1..1 + cnt] {
            let st = &mut stamps[nb as usize];
            if *st != gen && nf < fresh.len() {
                *st = gen;
                fresh[nf] = nb;
                nf += 1;
                simd::prefetch(vec_of(nb), 2);
            }
        }
        const AHEAD: usize = 1;
        for &nb in fresh[..nf.min(AHEAD)].iter() {
            simd::prefetch(vec_of(nb), lines);
        }
        for (j, &nb) in fresh[..nf].iter().enumerate() {
            if let Some(&next) = fresh[..nf].get(j + AHEAD) {
                simd::prefetch(vec_of(next), lines);
            }
            let s = K::dot(q, vec_of(nb));
            if res.len() < ef || s > lower {
                cand.push(Scored(s, nb));
                if all || accept(nb) {
                    res.push(Reverse(Scored(s, nb)));
                    if res.len() > ef {
                        res.pop();
                    }
                    if res.len() >= ef {
                        if let Some(Reverse(w)) = res.peek() {
                            lower = w.0;
                        }
                    }
                }
            }
        }
    }
    let mut out: Vec<(f32, u32)> = res.drain().map(|Reverse(Scored(s, i))| (s, i)).collect();
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    out
}

/// Exact top-`k` over `rows` (or all rows when `rows` is `None`) accepted by `accept`:
/// `(score, row)` best first.
pub fn exact_search(
    vectors: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
    rows: Option<&[u32]>,
    accept: &dyn Fn(u32) -> bool,
) -> Vec<(f32, u32)> {
    if k == 0 || dim == 0 {
        return Vec::new();
    }
    let n = vectors.len() / dim;
    let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
    let mut consider = |i: u32| {
        if !accept(i) {
            return;
        }
        let a = i as usize * dim;
        let s = simd::dot(query, &vectors[a..a + dim]);
        if heap.len() < k {
            heap.push(Reverse(Scored(s, i)));
        } else if let Some(Reverse(w)) = heap.peek() {
            if Scored(s, i) > *w {
                heap.pop();
                heap.push(Reverse(Scored(s, i)));
            }
        }
    };
    match rows {
        Some(rows) => rows
            .iter()
            .filter(|&&r| (r as usize) < n)
            .for_each(|&r| consider(r)),
        None => (0..n as u32).for_each(&mut consider),
    }
    let mut out: Vec<(f32, u32)> = heap
        .into_iter()
        .map(|Reverse(Scored(s, i))| (s, i))
        .collect();
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    out
}
