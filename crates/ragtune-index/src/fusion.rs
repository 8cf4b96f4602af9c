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
    out.into_iter()
        .map(|(id, score, _)| Hit { id, score })
        .collect()
}

/// Document-level RRF: like [`rrf`], but a list's ranks count *documents* (`doc_of` maps a
/// hit id to its document; a document is ranked where its best chunk is), so one document
/// with many matching chunks cannot crowd the others out of a list. Documents are ordered by
/// `Σ weight / (rrf_k + document rank)`; the result gives each document's best chunk (by
/// chunk-level RRF) in that order, then the remaining chunks by chunk-level RRF, and keeps
/// `k`. [`Hit::score`] is the document's score for its best chunk and the chunk-level score
/// for the others.
pub fn rrf_by_doc<D: std::hash::Hash + Eq + Clone>(
    lists: &[(&[Hit], f32)],
    rrf_k: f32,
    k: usize,
    doc_of: impl Fn(u64) -> D,
) -> Vec<Hit> {
    let chunks = rrf(lists, rrf_k, usize::MAX);
    let mut doc_score: HashMap<D, f32> = HashMap::new();
    for (list, weight) in lists {
        let mut seen = std::collections::HashSet::new();
        for hit in list.iter() {
            let d = doc_of(hit.id);
            if seen.insert(d.clone()) {
                *doc_score.entry(d).or_insert(0.0) += weight / (rrf_k + seen.len() as f32);
            }
        }
    }
    // Best chunk of each document (chunks are in chunk-score order), then the rest.
    let mut firsts: Vec<(f32, usize, Hit)> = Vec::new();
    let mut rest: Vec<Hit> = Vec::new();
    let mut placed = std::collections::HashSet::new();
    for (pos, hit) in chunks.into_iter().enumerate() {
        let d = doc_of(hit.id);
        if placed.insert(d.clone()) {
            let s = doc_score.get(&d).copied().unwrap_or(0.0);
            firsts.push((
                s,
                pos,
                Hit {
                    id: hit.id,
                    score: s,
                },
            ));
        } else {
            rest.push(hit);
        }
    }
    firsts.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    firsts
        .into_iter()
        .map(|(_, _, h)| h)
        .chain(rest)
        .take(k)
        .collect()
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

    #[test]
    fn documents_are_ranked_by_their_best_chunks() {
        // Chunks 10, 11, 12 belong to document 1; 20 to document 2; 30 to document 3.
        let doc = |id: u64| id / 10;
        let a = hits(&[10, 11, 12, 20]);
        let b = hits(&[30, 20]);
        let got = rrf_by_doc(&[(&a, 1.0), (&b, 1.0)], 60.0, 10, doc);
        // doc 2: rank 2 in a, rank 2 in b; doc 1: rank 1 in a; doc 3: rank 1 in b.
        let ids: Vec<u64> = got.iter().map(|h| h.id).collect();
        assert_eq!(ids[0], 20, "{ids:?}");
        assert!((got[0].score - 2.0 / 62.0).abs() < 1e-7);
        assert_eq!(&ids[1..3], &[10, 30]);
        assert_eq!(&ids[3..], &[11, 12]);
        assert_eq!(rrf_by_doc(&[(&a, 1.0)], 60.0, 2, doc).len(), 2);
    }
}
