//! `ragtune serve` on the subset index: the OpenAI wire format in every mode (streamed and
//! not), embeddings, the error statuses, the official `openai` Python client, a bounded load
//! test, and a clean SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{self, ragtune, run_with_stdin};

const KEY: &str = "test-key";

/// The memory bound of the server under the load test (peak RSS), bytes: the model, the
/// encoder, the index and a KV cache per running answer fit well within it.
const RSS_BOUND: u64 = 2 << 30;

/// A running `ragtune serve` on a free port.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(index: &Path, extra: &[&str]) -> Server {
        let mut child = ragtune(index)
            .args(["serve", "--port", "0", "--api-key", KEY])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ragtune serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(url.to_string());
                }
                eprintln!("[serve] {line}");
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the server prints its address");
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` with the key; the status and the body text.
    fn post(&self, path: &str, body: &Value) -> (u16, String, Option<String>) {
        let r = ureq::post(&self.url(path))
            .set("Authorization", &format!("Bearer {KEY}"))
            .send_json(body.clone());
        into_parts(r)
    }

    fn chat(&self, body: Value) -> Value {
        let (status, text, _) = self.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).expect("completion JSON")
    }

    /// The `data:` payloads of a streamed chat, `[DONE]` last.
    fn chat_stream(&self, mut body: Value) -> Vec<String> {
        body["stream"] = json!(true);
        let (status, text, _) = self.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "serve exited with {status}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn into_parts(r: Result<ureq::Response, ureq::Error>) -> (u16, String, Option<String>) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    let mut text = String::new();
    resp.into_reader()
        .read_to_string(&mut text)
        .expect("read body");
    (status, text, retry)
}

fn ask(model: &str, question: &str, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

fn error_of(status: u16, body: &str, want: u16) -> Value {
    assert_eq!(status, want, "{body}");
    let v: Value = serde_json::from_str(body).expect("error JSON");
    assert!(v["error"]["message"].is_string(), "{body}");
    v
}

#[test]
fn the_openai_api_answers_in_every_mode_streamed_and_not() {
    let ix = util::subset_index();
    let server = Server::start(&ix.index, &[]);
    let question = "What is the SPDX identifier of the Apache License 2.0?";

    // Health needs no key; the models are the modes and the adapter's names.
    let health = ureq::get(&server.url("/health")).call().expect("health");
    assert_eq!(health.status(), 200);
    let models: Value = ureq::get(&server.url("/v1/models"))
        .set("Authorization", &format!("Bearer {KEY}"))
        .call()
        .expect("models")
        .into_json()
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    for id in ["hybrid", "rag", "finetune", "base", "hybrid:licenses-lora"] {
        assert!(ids.contains(&id), "{ids:?}");
    }

    for mode in ["hybrid", "rag", "finetune", "base"] {
        let full = server.chat(ask(mode, question, 24));
        let text = text_of(&full);
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["model"], mode);
        let usage = &full["usage"];
        assert!(
            usage["completion_tokens"].as_u64().expect("n") > 0,
            "{full}"
        );
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().expect("p")
                    + usage["completion_tokens"].as_u64().expect("c")
            )
        );
        let ext = &full["ragtune"];
        assert_eq!(ext["mode"], mode);
        let sources = ext["sources"].as_array().expect("sources");
        if mode == "hybrid" || mode == "rag" {
            assert!(
                sources.iter().any(|s| s["doc_id"] == "apache-2.0"),
                "{mode}: {ext}"
            );
        } else {
            assert!(sources.is_empty(), "{mode}: {ext}");
        }
        assert_eq!(
            ext["adapter"].as_str().is_some(),
            mode == "hybrid" || mode == "finetune",
            "{ext}"
        );

        // Streamed: the same text, a role chunk first, the extension on the last chunk.
        let events = server.chat_stream(ask(mode, question, 24));
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("chunk JSON"))
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, text, "{mode}");
        let last = chunks.last().expect("chunks");
        assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
        assert_eq!(last["ragtune"]["sources"], ext["sources"]);
        for n in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(last["usage"][n], full["usage"][n], "{n}");
        }
        // The same question again: its prompt comes from the prefix cache up to the question
        // (retrieval modes) or up to the last whole block (closed book).
        let cached = |u: &Value| {
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached_tokens")
        };
        assert!(
            cached(&last["usage"]) > cached(&full["usage"]),
            "{mode}: {} then {}",
            full["usage"],
            last["usage"]
        );
    }

    // History: earlier turns reach the prompt.
    let with_history = server.chat(json!({
        "model": "rag",
        "messages": [
            {"role": "system", "content": "ignored: the profile's system prompt is used"},
            {"role": "user", "content": "Who owns the zlib license?"},
            {"role": "assistant", "content": "The zlib license is owned by Jean-loup Gailly."},
            {"role": "user", "content": question},
        ],
        "max_tokens": 8,
    }));
    assert_eq!(with_history["ragtune"]["history_messages"], 2);

    // Embeddings equal `ragtune embed`.
    let (status, body, _) = server.post(
        "/v1/embeddings",
        &json!({"model": "any", "input": ["MIT License", "GPL"]}),
    );
    assert_eq!(status, 200, "{body}");
    let served: Value = serde_json::from_str(&body).expect("json");
    let cli = run_with_stdin(ragtune(&ix.index).arg("embed"), b"MIT License\nGPL\n");
    let cli: Vec<Value> = String::from_utf8(cli.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("embed line"))
        .collect();
    for (i, line) in cli.iter().enumerate() {
        assert_eq!(served["data"][i]["embedding"], line["embedding"], "row {i}");
    }
    assert!(served["usage"]["prompt_tokens"].as_u64().expect("tokens") >= 4);

    // Errors, in OpenAI's format with the right status.
    let chat = |body: &Value| server.post("/v1/chat/completions", body);
    let (s, b, _) = into_parts(
        ureq::post(&server.url("/v1/chat/completions"))
            .set("Authorization", &format!("Bearer {KEY}"))
            .set("Content-Type", "application/json")
            .send_string("{not json"),
    );
    error_of(s, &b, 400);
    let (s, b, _) =
        chat(&json!({"model": "rag", "n": 2, "messages": [{"role": "user", "content": "x"}]}));
    assert_eq!(error_of(s, &b, 400)["error"]["param"], "n");
    let long = "word ".repeat(3000);
    let (s, b, _) = chat(&ask("base", &long, 16));
    let e = error_of(s, &b, 400);
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{b}");
    assert!(
        e["error"]["message"]
            .as_str()
            .expect("m")
            .contains("2032 tokens"),
        "{b}"
    );
    let (s, b, _) = chat(&ask("gpt-4", "x", 4));
    assert_eq!(error_of(s, &b, 404)["error"]["code"], "model_not_found");
    let (s, b, _) = chat(&ask("hybrid:nope", "x", 4));
    error_of(s, &b, 404);
    let (s, b, _) = chat(
        &json!({"model": "rag", "messages": [{"role": "user", "content": "x"}], "ragtune": {"filter": "categroy=Permissive"}}),
    );
    assert!(error_of(s, &b, 400)["error"]["message"]
        .as_str()
        .expect("m")
        .contains("categroy"));
    let (s, b, _) =
        into_parts(ureq::post(&server.url("/v1/chat/completions")).send_json(ask("rag", "x", 4)));
    assert_eq!(error_of(s, &b, 401)["error"]["code"], "invalid_api_key");
    let (s, b, _) = into_parts(
        ureq::post(&server.url("/v1/chat/completions"))
            .set("Authorization", "Bearer wrong")
            .send_json(ask("rag", "x", 4)),
    );
    error_of(s, &b, 401);

    openai_client(&server);
    server.stop();
}

/// The official `openai` Python client (the version in tests/serve/requirements.txt),
/// installed once into the test target folder.
fn openai_client(server: &Server) {
    let python = std::env::var("RAGTUNE_PYTHON").unwrap_or_else(|_| "python3".into());
    if std::process::Command::new(&python)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "\n*** SKIPPED: the openai-client check of `ragtune serve` needs Python 3 ({python} \
             was not found) ***\n"
        );
        return;
    }
    let repo = util::repo();
    let requirements = repo.join("tests/serve/requirements.txt");
    let pinned = std::fs::read_to_string(&requirements).expect("requirements");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "python-{}",
        pinned.trim().replace(['=', '\n'], "-")
    ));
    if !target.join("openai").is_dir() {
        let out = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(&target)
            .arg("-r")
            .arg(&requirements)
            .output()
            .expect("pip");
        assert!(
            out.status.success(),
            "installing the openai client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(&python)
        .arg(repo.join("tests/serve/openai_client.py"))
        .arg(server.url("/v1"))
        .arg(KEY)
        .env("PYTHONPATH", &target)
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "openai client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    for mode in ["hybrid", "rag", "finetune", "base"] {
        assert!(
            !r["modes"][mode]["text"].as_str().expect("text").is_empty(),
            "{r}"
        );
    }
    assert!(r["modes"]["rag"]["sources"]
        .as_array()
        .expect("sources")
        .contains(&json!("apache-2.0")));
    // The base64 form the client asks for by default decodes to the same vectors.
    let (b64, float) = (&r["embeddings_base64"], &r["embeddings_float"]);
    for (a, b) in b64
        .as_array()
        .expect("rows")
        .iter()
        .zip(float.as_array().expect("rows"))
    {
        let a: Vec<f64> = serde_json::from_value(a.clone()).expect("floats");
        let b: Vec<f64> = serde_json::from_value(b.clone()).expect("floats");
        assert_eq!(a.len(), 384);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
    let e = &r["errors"];
    assert_eq!(e["unknown_model"], 404, "{r}");
    assert_eq!(e["n_2"], 400, "{r}");
    assert_eq!(e["too_long"], 400, "{r}");
    assert_eq!(e["last_not_user"], 400, "{r}");
    assert_eq!(e["wrong_key"], 401, "{r}");
}

#[test]
fn sixteen_clients_get_the_sequential_answers_and_a_full_queue_gets_503() {
    let ix = util::subset_index();
    // With batched decoding on: the concurrent answers' steps share forward passes. Without
    // the prefix cache: with it, what a request finds cached depends on the order requests
    // come in, and with the quantized kernels a prompt prefilled in other pieces can flip a
    // near tie (docs/kv-cache.md); the engine tests check concurrent reuse on the f32 path.
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("ragtune.toml");
    std::fs::write(&config, "batch_decode = true\nprefix_cache = false\n").expect("config");
    let server = Server::start(
        &ix.index,
        &[
            "--config",
            config.to_str().expect("utf-8"),
            "--max-concurrent",
            "2",
            "--queue",
            "64",
        ],
    );
    let cases: Vec<Value> = [
        ("rag", "Who owns the ISC license?"),
        ("base", "What does the MIT license allow?"),
        ("hybrid", "What is the SPDX id of the zlib license?"),
        (
            "finetune",
            "What is the category of the Apache License 2.0?",
        ),
    ]
    .iter()
    .map(|(m, q)| ask(m, q, 12))
    .collect();
    let sequential: Vec<String> = cases
        .iter()
        .map(|c| text_of(&server.chat(c.clone())))
        .collect();

    let answers: Vec<(usize, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|client| {
                let (server, cases) = (&server, &cases);
                s.spawn(move || {
                    (0..4)
                        .map(|r| {
                            let case = (client + r) % cases.len();
                            (case, text_of(&server.chat(cases[case].clone())))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(answers.len(), 64);
    for (case, text) in &answers {
        assert_eq!(text, &sequential[*case], "case {case}");
    }
    // The steps were batched: more rows than steps.
    let health: Value = ureq::get(&server.url("/health"))
        .call()
        .expect("health")
        .into_json()
        .expect("json");
    let (steps, rows) = (
        health["decode"]["steps"].as_u64().expect("steps"),
        health["decode"]["rows"].as_u64().expect("rows"),
    );
    assert!(rows > steps && steps > 0, "{health}");
    let rss = server.peak_rss();
    assert!(rss < RSS_BOUND, "peak RSS {rss} bytes > {RSS_BOUND}");
    server.stop();

    // One slot, no queue: a second request while the first runs gets 503 with Retry-After.
    let server = Server::start(&ix.index, &["--max-concurrent", "1", "--queue", "0"]);
    std::thread::scope(|s| {
        let long = s.spawn(|| server.chat(ask("rag", "Write a long story about licenses.", 96)));
        std::thread::sleep(Duration::from_millis(400));
        let (status, body, retry) = server.post("/v1/chat/completions", &ask("base", "x", 4));
        let e = error_of(status, &body, 503);
        assert_eq!(e["error"]["code"], "server_busy");
        assert_eq!(retry.as_deref(), Some("1"));
        let first = long.join().expect("the first request");
        assert_eq!(first["object"], "chat.completion");
    });
    server.stop();
}
