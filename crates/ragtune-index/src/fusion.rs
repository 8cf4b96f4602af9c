//! Reciprocal rank fusion of ranked hit lists.
//!
//! RRF (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet and
//! individual Rank Learning Methods", SIGIR 2009): a hit at 1-based rank `r` of a list with
//! weight `w` contributes `w / (k + r)`; contributions add up over the lists. `k = 60` is the
//! paper's constant and the default of every RAG stack that fuses this way.

use std::collections::HashMap;

use crate::Hit;

/// The RRF constant of the paper.
pub const RRF_K: f32 = 60.0;

/// Fuses ranked `lists` (each best first, with its weight) into the top `k` hits by RRF
/// score; [`Hit::score`] of the result is that score. Ties go to the hit ranked best in any
/// list, then to the lower id. A hit repeated within one list counts at its best rank.
pub fn rrf(lists: &[(&[Hit], f32)], rrf_k: f32, k: usize) -> Vec<Hit> {
    // id -> (score, best rank)
    let mut acc: HashMap<u64, (f32, usize)> = HashMap::new();
    for (list, weight) in lists {
        let mut seen = std::collections::HashSet::new();
        for (rank, hit) in list.iter().enumerate() {
            if !seen.insert(hit.id) {
                continue;
            }
            let e = acc.entry(hit.id).or_insert((0.0, usize::MAX));
            e.0 += weight / (rrf_k + (rank + 1) as f32);
            e.1 = e.1.min(rank);
        }
    }
    let mut out: Vec<(u64, f32, usize)> = acc.into_iter().map(|(id, (s, r))| (id, s, r)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
    out.truncate(k);
    out.into_iter().map(|(id, score, _)| Hit { id, score }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(ids: &[u64]) -> Vec<Hit> {
        ids.iter().map(|&id| Hit { id, score: 0.0 }).collect()
    }

    #[test]
    fn scores_follow_the_formula() {
        let a = hits(&[1, 2, 3]);
        let b = hits(&[3, 1]);
        let got = rrf(&[(&a, 1.0), (&b, 1.0)], 60.0, 10);
        let s1 = 1.0 / 61.0 + 1.0 / 62.0;
        let s3 = 1.0 / 63.0 + 1.0 / 61.0;
        let s2 = 1.0 / 62.0;
        assert_eq!(got.iter().map(|h| h.id).collect::<Vec<_>>(), [1, 3, 2]);
        assert!((got[0].score - s1).abs() < 1e-7);
        assert!((got[1].score - s3).abs() < 1e-7);
        assert!((got[2].score - s2).abs() < 1e-7);
    }

    #[test]
    fn weights_and_truncation() {
        let a = hits(&[1, 2]);
        let b = hits(&[2, 1]);
        let got = rrf(&[(&a, 1.0), (&b, 3.0)], 60.0, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, 2);
        assert!(rrf(&[], 60.0, 5).is_empty());
    }
}
