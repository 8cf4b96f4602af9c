//! Fuzzing the loaders with proptest (cargo-fuzz needs a nightly toolchain, which this
//! project's machines do not have): the GGUF reader on arbitrary bytes, typed metadata and
//! the tokenizer on mutated metadata of a valid tiny model, the PEFT adapter config on
//! arbitrary JSON, and the chat-template compiler and renderer on arbitrary templates and
//! messages. Each must return a value or a typed error, never panic. `PROPTEST_CASES` sets
//! the cases per target (default 256).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use proptest::prelude::*;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::lora::LoraConfig;
use crate::props::tests::tiny;
use crate::{LlamaProps, Tokenizer};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

/// A metadata value of a random type.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u32>().prop_map(Value::U32),
        any::<u64>().prop_map(Value::U64),
        any::<i32>().prop_map(Value::I32),
        any::<f32>().prop_map(Value::F32),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,12}".prop_map(Value::String),
        proptest::collection::vec(any::<u32>().prop_map(Value::U32), 0..4).prop_map(Value::Array),
        proptest::collection::vec("\\PC{0,6}".prop_map(Value::String), 0..4).prop_map(Value::Array),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// GGUF bytes: a valid magic and version followed by anything, and anything at all.
    #[test]
    fn gguf_reader_on_arbitrary_bytes(tail in proptest::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        let mut bytes = Vec::new();
        if magic {
            bytes.extend_from_slice(b"GGUF");
            bytes.extend_from_slice(&3u32.to_le_bytes());
        }
        bytes.extend_from_slice(&tail);
        let mut cursor = std::io::Cursor::new(bytes);
        if let Ok(content) = Content::read(&mut cursor) {
            let _ = LlamaProps::from_metadata(&content.metadata);
            let _ = Tokenizer::from_metadata(&content.metadata);
        }
    }

    /// The tiny model's metadata with one key replaced by a value of any type, or removed.
    #[test]
    fn typed_metadata_and_tokenizer_on_mutated_metadata(key_ix in any::<usize>(), v in proptest::option::of(value())) {
        let mut md: HashMap<String, Value> = tiny();
        let mut keys: Vec<String> = md.keys().cloned().collect();
        keys.sort();
        let key = keys[key_ix % keys.len()].clone();
        match v {
            Some(v) => { md.insert(key, v); }
            None => { md.remove(&key); }
        }
        let _ = LlamaProps::from_metadata(&md);
        let _ = Tokenizer::from_metadata(&md);
    }

    /// `adapter_config.json` as arbitrary JSON objects of the PEFT keys.
    #[test]
    fn adapter_config_on_arbitrary_json(
        r in prop_oneof![Just(serde_json::json!(8)), Just(serde_json::json!(0)), Just(serde_json::json!(-1)), Just(serde_json::json!("8")), Just(serde_json::json!(1e300))],
        alpha in prop_oneof![Just(serde_json::json!(16)), Just(serde_json::json!(1e300)), Just(serde_json::json!(null)), Just(serde_json::json!("x"))],
        targets in prop_oneof![Just(serde_json::json!(["q_proj"])), Just(serde_json::json!("all-linear")), Just(serde_json::json!([])), Just(serde_json::json!([1, 2])), Just(serde_json::json!(["nope"]))],
        peft in prop_oneof![Just(serde_json::json!("LORA")), Just(serde_json::json!("IA3")), Just(serde_json::json!(7))],
    ) {
        let j = serde_json::json!({"r": r, "lora_alpha": alpha, "target_modules": targets, "peft_type": peft});
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("adapter_config.json");
        std::fs::write(&path, j.to_string()).expect("write");
        let _ = LoraConfig::read(&path);
    }

    /// Templates built from Jinja fragments, rendered with arbitrary messages.
    #[test]
    fn chat_templates_on_arbitrary_input(
        parts in proptest::collection::vec(prop_oneof![
            Just("{% for m in messages %}"), Just("{% endfor %}"), Just("{{ m.content }}"),
            Just("{{ m.role }}"), Just("{% if add_generation_prompt %}"), Just("{% endif %}"),
            Just("{{ raise_exception('x') }}"), Just("{{ messages[99].content }}"),
            Just("{{ bos_token }}"), Just("{{ m.content.strip() }}"), Just("{{ 1/0 }}"),
            Just("{%"), Just("}}"), Just("text"),
        ], 0..8),
        contents in proptest::collection::vec("\\PC{0,20}", 0..4),
    ) {
        let source: String = parts.concat();
        if let Ok(t) = ChatTemplate::new(source, "<s>", "</s>") {
            let messages: Vec<ChatMessage> = contents
                .into_iter()
                .enumerate()
                .map(|(i, c)| if i % 2 == 0 { ChatMessage::user(c) } else { ChatMessage::assistant(c) })
                .collect();
            let _ = t.render(&messages, true);
        }
    }
}
