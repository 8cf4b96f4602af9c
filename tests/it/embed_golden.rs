//! MiniLM embeddings against sentence-transformers (`tests/golden/minilm_l6_v2.json`): the
//! f32 encoder to within float rounding, the int8 one (Q8_0 projections) and the bf16 one
//! (AMX) to within their roundings.

use ragtune_embed::Precision;

use crate::util;

/// How close each precision must come to sentence-transformers: (cosine at least, max abs
/// difference at most). Int8: the 6 golden texts without a line break measured cosine
/// 0.99930 and max abs difference 0.0059 at worst through `ragtune embed`; the 2,048 anchor
/// passages 0.99917 against the f32 encoder (0.99969 on average); the dev-set retrieval
/// moved by under 0.5 points (benches/README.md).
///
/// Bf16 (AMX): the same 8 texts measured cosine 0.999985 and max abs difference 9.0e-4 at
/// worst (2026-12-08, Sapphire Rapids).
fn tolerance(precision: Precision) -> (f32, f32) {
    match precision {
        Precision::Int8 => (0.999, 0.01),
        Precision::Bf16 => (0.99995, 2e-3),
        _ => (0.9999, 1e-4),
    }
}

/// What `precision` runs as on this CPU (bf16 needs AMX; see [`Precision::resolve`]).
fn resolved(precision: Precision) -> Precision {
    let got = precision.resolve(ragtune_util::cpu::SimdLevel::active());
    if got != precision {
        eprintln!("{precision} runs as {got} on this CPU");
    }
    got
}

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

fn assert_close(precision: Precision, text: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let (min_cos, max_abs) = tolerance(precision);
    let cos = util::cosine(got, want);
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        cos >= min_cos && max_diff <= max_abs,
        "{precision}: {text:?}: cosine {cos}, max abs diff {max_diff}"
    );
}

#[test]
fn token_ids_match_sentence_transformers() {
    let enc = util::encoder();
    for (text, ids, _) in cases() {
        assert_eq!(enc.token_ids(&text).expect("tokenize"), ids, "{text:?}");
    }
}

fn one_by_one(precision: Precision) {
    let enc = util::encoder_in(precision);
    let precision = resolved(precision);
    assert_eq!(enc.precision(), precision);
    for (text, _, want) in cases() {
        let got = enc.encode(&[text.as_str()]).expect("encode");
        assert_close(precision, &text, got.row(0), &want);
    }
}

fn in_one_batch(precision: Precision) {
    // All 8 in one call: sorted by length and packed (256 pieces for the longest), so the
    // per-sequence attention and the pooling are exercised.
    let enc = util::encoder_in(precision);
    let precision = resolved(precision);
    assert_eq!(enc.precision(), precision);
    let cases = cases();
    let texts: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let got = enc.encode(&texts).expect("encode");
    assert_eq!((got.len(), got.dim), (8, 384));
    for (i, (text, _, want)) in cases.iter().enumerate() {
        assert_close(precision, text, got.row(i), want);
    }
}

#[test]
fn f32_embeddings_match_sentence_transformers_one_by_one() {
    one_by_one(Precision::F32);
}

#[test]
fn f32_embeddings_match_in_one_batch() {
    in_one_batch(Precision::F32);
}

#[test]
fn int8_embeddings_match_sentence_transformers_one_by_one() {
    one_by_one(Precision::Int8);
}

#[test]
fn int8_embeddings_match_in_one_batch() {
    in_one_batch(Precision::Int8);
}

#[test]
fn bf16_embeddings_match_sentence_transformers_one_by_one() {
    one_by_one(Precision::Bf16);
}

#[test]
fn bf16_embeddings_match_in_one_batch() {
    in_one_batch(Precision::Bf16);
}

/// An int8 row does not depend on the batch it is encoded in (the integer kernels are
/// batch-size invariant), so a chunk's vector is the same at ingest and as a query.
#[test]
fn int8_rows_equal_alone_and_in_a_batch() {
    rows_equal_alone_and_in_a_batch(Precision::Int8);
}

/// Nor does a bf16 row (each AMX output sums its own row's products in a fixed order).
#[test]
fn bf16_rows_equal_alone_and_in_a_batch() {
    rows_equal_alone_and_in_a_batch(Precision::Bf16);
}

fn rows_equal_alone_and_in_a_batch(precision: Precision) {
    let enc = util::encoder_in(precision);
    let cases = cases();
    let texts: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let together = enc.encode(&texts).expect("encode");
    for (i, text) in texts.iter().enumerate() {
        let alone = enc.encode(&[*text]).expect("encode");
        assert!(alone.row(0) == together.row(i), "{text:?}");
    }
}
