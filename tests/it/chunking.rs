//! Token-aware chunking on real license texts: byte ranges round-trip, sizes hold.

use ragtune::corpus::{read_document, CorpusOptions};
use ragtune_embed::{ChunkParams, Chunker};

use crate::util;

#[test]
fn chunks_round_trip_byte_ranges_and_respect_the_token_budget() {
    let enc = util::encoder();
    let params = ChunkParams {
        max_tokens: 128,
        overlap_tokens: 16,
    };
    let chunker = Chunker::new(enc.tokenizer(), params).expect("chunker");
    for key in ["apache-2.0", "gpl-3.0", "mit", "beerware"] {
        let doc = read_document(
            &util::licenses_dir().join(format!("{key}.LICENSE")),
            &CorpusOptions::default(),
        )
        .expect("read");
        let body = doc.body();
        let spans = chunker.split(body).expect("split");
        assert!(!spans.is_empty(), "{key}");
        let mut covered = vec![false; body.len()];
        for (i, s) in spans.iter().enumerate() {
            let text = &body[s.start..s.end];
            // The span's own text re-tokenizes to the same number of pieces.
            let ids = enc
                .tokenizer()
                .encode(text, false)
                .expect("tok")
                .get_ids()
                .len();
            assert!(ids <= params.max_tokens, "{key} chunk {i}: {ids} pieces");
            assert_eq!(ids, s.tokens, "{key} chunk {i}");
            assert!(!text.starts_with(char::is_whitespace) && !text.ends_with(char::is_whitespace));
            covered[s.start..s.end].iter_mut().for_each(|c| *c = true);
            if i > 0 {
                assert!(
                    s.start > spans[i - 1].start && s.start <= spans[i - 1].end,
                    "{key}: chunks overlap or touch"
                );
            }
        }
        // Every non-whitespace byte of the body is in some chunk.
        for (i, b) in body.bytes().enumerate() {
            assert!(
                covered[i] || b.is_ascii_whitespace(),
                "{key}: byte {i} not covered"
            );
        }
    }
}
