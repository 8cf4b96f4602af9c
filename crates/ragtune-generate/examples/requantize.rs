//! Re-quantizes a GGUF file per a plan: `requantize SRC DST PLAN.json`, the plan a JSON
//! object of tensor name to GGML type (`{"blk.0.ffn_down.weight": "Q6_K", ...}`). Used by
//! `benches/anchors/requant_golden.py` to build the files whose llama.cpp outputs are the
//! golden references of `tests/it/generate_quant_types.rs`.

use std::collections::HashMap;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst, plan] = args.as_slice() else {
        return Err("usage: requantize SRC DST PLAN.json".into());
    };
    let plan: HashMap<String, String> = serde_json::from_slice(&std::fs::read(plan)?)?;
    let plan = plan
        .into_iter()
        .map(|(k, v)| Ok((k, ragtune_generate::ggml_dtype(&v)?)))
        .collect::<Result<HashMap<_, _>, ragtune_generate::Error>>()?;
    ragtune_generate::requantize(Path::new(src), Path::new(dst), &plan)?;
    Ok(())
}
