//! MiniLM embeddings against sentence-transformers (`tests/golden/minilm_l6_v2.json`).

use crate::util;

fn cases() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let g = util::golden("minilm_l6_v2.json");
    assert_eq!(
        g["model_sha256"].as_str(),
        Some(util::encoder().identity().model_sha256.as_str()),
        "the golden file was made with the pinned model"
    );
    g["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let text = c["text"].as_str().expect("text").to_string();
            let ids = util::ids(&c["token_ids"]);
            let emb = c["embedding"]
                .as_array()
                .expect("emb")
                .iter()
                .map(|v| v.as_f64().expect("f") as f32)
                .collect();
            (text, ids, emb)
        })
        .collect()
}

fn assert_close(text: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let cos = util::cosine(got, want);
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        cos >= 0.9999 && max_diff <= 1e-4,
        "{text:?}: cosine {cos}, max abs diff {max_diff}"
    );
}

#[test]
fn token_ids_match_sentence_transformers() {
    let enc = util::encoder();
    for (text, ids, _) in cases() {
        assert_eq!(enc.token_ids(&text).expect("tokenize"), ids, "{text:?}");
    }
}

#[test]
fn embeddings_match_sentence_transformers_one_by_one() {
    let enc = util::encoder();
    for (text, _, want) in cases() {
        let got = enc.encode(&[text.as_str()]).expect("encode");
        assert_close(&text, got.row(0), &want);
    }
}

#[test]
fn embeddings_match_in_one_padded_batch() {
    // All 8 in one call: sorted by length and padded to the longest (256 pieces), so the
    // attention mask and the pooling over padding are exercised.
    let enc = util::encoder();
    let cases = cases();
    let texts: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let got = enc.encode(&texts).expect("encode");
    assert_eq!((got.len(), got.dim), (8, 384));
    for (i, (text, _, want)) in cases.iter().enumerate() {
        assert_close(text, got.row(i), want);
    }
}
