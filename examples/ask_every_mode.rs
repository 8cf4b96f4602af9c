//! The Rust API: build an [`Engine`] on the embedded defaults and ask one question in each
//! mode. Modes that need an adapter are skipped, with the reason, when none is configured
//! (`ragtune.toml`, or the shipped `models/adapters/licenses-lora`).
//!
//! ```sh
//! cargo run --release --example ask_every_mode -- "Who owns the MIT License?"
//! ```

use ragtune::engine::{Engine, EngineConfig, Mode, Request, CONFIG_FILE};
use ragtune::progress::Progress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the SPDX identifier of the Apache License 2.0?".into());
    let mut config = EngineConfig::load_or_default(CONFIG_FILE)?;
    let shipped = config.models_dir.join("adapters/licenses-lora");
    if config.adapters.is_empty() && shipped.exists() {
        config.adapters.insert("licenses-lora".into(), shipped);
        config.default_adapter = Some("licenses-lora".into());
    }
    // Fetches the models and builds the LicenseDB index on first use.
    let engine = Engine::open(config, &Progress::stderr())?;
    for mode in Mode::ALL {
        let mut request = Request::new(&question, mode);
        request.max_tokens = Some(64);
        match engine.answer(&request) {
            Ok(answer) => {
                let sources: Vec<&str> = answer.sources.iter().map(|s| s.doc_id.as_str()).collect();
                println!(
                    "{mode:>8}: {}\n          sources {sources:?}, first token {:.0} ms, total {:.0} ms",
                    answer.text.trim(),
                    answer.timings.first_token,
                    answer.timings.total
                );
            }
            Err(e) => println!("{mode:>8}: skipped ({e})"),
        }
    }
    Ok(())
}
