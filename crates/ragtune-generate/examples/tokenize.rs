//! The token ids of each stdin line under a GGUF file's own tokenizer, as JSON lines
//! (`{"text": .., "ids": [..]}`), like llama.cpp's `llama-tokenize`: `tokenize GGUF
//! [--special]` (`--special`: special-token text becomes the special token). Reads only the
//! metadata, so it works for any file whose tokenizer this crate builds.

use std::io::BufRead;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        return Err("usage: tokenize GGUF [--special] < lines".into());
    };
    let special = if args.iter().any(|a| a == "--special") {
        ragtune_generate::SpecialTokens::Parse
    } else {
        ragtune_generate::SpecialTokens::AsText
    };
    let tok = ragtune_generate::Tokenizer::from_gguf(&ragtune_generate::read_gguf(path)?)?;
    for line in std::io::stdin().lock().lines() {
        let text = line?;
        let ids = tok.encode(&text, special)?;
        println!("{}", serde_json::json!({"text": text, "ids": ids}));
    }
    Ok(())
}
