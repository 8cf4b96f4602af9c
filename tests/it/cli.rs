//! The `ragtune` binary: the JSON contract of `search`, batch mode, bad input to `ingest`,
//! a killed ingest, and the chat driven through stdin.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::{self, ragtune, run_ok, run_with_stdin};

fn search_json(index: &Path, query: &str) -> serde_json::Value {
    let out = run_ok(ragtune(index).args(["search", "--format", "json", "-k", "3", query]));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn search_json_matches_the_contract_and_batch_mode_keeps_order() {
    let ix = util::subset_index();
    let v = search_json(&ix.index, "MIT License");
    let obj = v.as_object().expect("object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["hits"]);
    let hits = v["hits"].as_array().expect("hits");
    assert_eq!(hits.len(), 3);
    for h in hits {
        let mut keys: Vec<_> = h.as_object().expect("hit").keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["chunk", "doc_id", "score", "text"]);
        assert!(
            h["doc_id"].is_string()
                && h["chunk"].is_u64()
                && h["score"].is_f64()
                && h["text"].is_string()
        );
    }

    let queries = [
        "Apache License Version 2.0",
        "zlib license",
        "Do What The Fuck You Want To Public License",
    ];
    let out = run_with_stdin(
        ragtune(&ix.index).args(["search", "--format", "json", "-k", "2"]),
        queries.join("\n").as_bytes(),
    );
    util::assert_ok(&out);
    let lines = util::json_lines(&out.stdout);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["hits"][0]["doc_id"], "apache-2.0");
    assert_eq!(lines[1]["hits"][0]["doc_id"], "zlib");
    assert_eq!(lines[2]["hits"][0]["doc_id"], "wtfpl-2.0");
}

#[test]
fn bad_files_are_skipped_with_their_names_and_an_empty_folder_keeps_the_old_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    util::copy_subset_index(&index);
    let before = search_json(&index, "zlib license");

    // An empty folder: refused, the old index untouched.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let stderr = util::run_err(ragtune(&index).arg("ingest").arg(&empty));
    assert!(
        stderr.contains("no documents to ingest") && stderr.contains("empty"),
        "{stderr}"
    );
    assert_eq!(search_json(&index, "zlib license"), before);

    // Bad files next to one good one: each named and skipped, the good one indexed.
    let docs = tmp.path().join("docs");
    util::copy_subset(&docs, &["isc"]);
    std::fs::write(docs.join("binary.txt"), b"abc\0def").expect("w");
    std::fs::write(docs.join("latin1.txt"), b"caf\xe9 license").expect("w");
    std::fs::write(
        docs.join("broken.LICENSE"),
        "---\nkey: [unclosed\n---\nbody\n",
    )
    .expect("w");
    std::fs::write(docs.join("huge.txt"), vec![b'a'; 9 << 20]).expect("w");
    let out = ragtune(&index)
        .arg("ingest")
        .arg(&docs)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for (name, why) in [
        ("binary.txt", "binary"),
        ("latin1.txt", "not UTF-8"),
        ("broken.LICENSE", "front matter"),
        ("huge.txt", "limit"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(name) && l.contains(why)),
            "{name}: {stderr}"
        );
    }
    assert_eq!(
        search_json(&index, "zlib license")["hits"][0]["doc_id"],
        "isc"
    );
}

#[test]
fn a_killed_ingest_leaves_the_previous_index_intact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    util::copy_subset_index(&index);
    let before = search_json(&index, "Mozilla Public License");
    let docs = tmp.path().join("docs");
    util::copy_subset(&docs, util::SUBSET);
    for delay_ms in [300u64, 1500, 4000] {
        let mut child = ragtune(&index)
            .arg("ingest")
            .arg(&docs)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            search_json(&index, "Mozilla Public License"),
            before,
            "after a kill at {delay_ms} ms"
        );
    }
}

#[test]
fn index_delete_and_compact_through_the_cli() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    util::copy_subset_index(&index);
    let info = util::index_info;
    let before = info(&index);
    assert_eq!(before["documents"], util::SUBSET.len());
    assert_eq!(before["tombstones"], 0);

    run_ok(ragtune(&index).args(["index", "delete", "zlib"]));
    let hits = search_json(&index, "zlib license");
    assert!(hits["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .all(|h| h["doc_id"] != "zlib"));
    let deleted = info(&index);
    assert_eq!(deleted["documents"], util::SUBSET.len() - 1);
    assert!(deleted["tombstones"].as_u64().expect("n") > 0);

    run_ok(ragtune(&index).args(["index", "compact"]));
    let compacted = info(&index);
    assert_eq!(compacted["tombstones"], 0);
    assert_eq!(compacted["chunks"], deleted["chunks"]);
    assert_eq!(search_json(&index, "zlib license"), hits);
}

/// The chat, driven through stdin, switches modes and answers.
#[test]
fn the_chat_driven_through_stdin_switches_modes_and_answers() {
    let ix = util::subset_index();
    let script = [
        "/mode base",
        "What does the MIT license allow?",
        "/mode foo",
        "/mode rag",
        "/k 2",
        "What is the SPDX identifier of the Apache License 2.0?",
        "/sources",
        "/quit",
        "This line is after /quit and never answered.",
    ];
    let out = run_with_stdin(
        ragtune(&ix.index).args(["chat", "--max-tokens", "24", "--no-history-file"]),
        script.join("\n").as_bytes(),
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let stderr = String::from_utf8(out.stderr).expect("utf8");
    assert!(out.status.success(), "{stderr}");
    // No prompt or escape sequence on a piped stdout.
    assert!(
        !stdout.contains('\x1b') && !stdout.contains("> "),
        "{stdout}"
    );

    // stdout: the base answer, the rag answer, then what /sources lists.
    let (answers, sources) = stdout
        .split_once("\n[1] ")
        .unwrap_or_else(|| panic!("no /sources listing in {stdout:?}\nstderr: {stderr}"));
    // Each answer is followed by a newline (an answer may hold newlines itself): the first
    // line starts the base answer, the last ends the rag answer; that the base answer was
    // not empty also shows in the rag answer's memory (below).
    let lines: Vec<&str> = answers.lines().collect();
    assert!(lines.len() >= 2, "{stdout:?}");
    assert!(!lines[0].trim().is_empty(), "empty base answer: {stdout:?}");
    assert!(
        !lines[lines.len() - 1].trim().is_empty(),
        "empty rag answer: {stdout:?}"
    );
    let listed: Vec<&str> = std::iter::once(sources)
        .chain(sources.split("\n[").skip(1))
        .collect();
    assert_eq!(listed.len(), 2, "k 2: {sources}");
    assert!(sources.contains("apache-2.0 chunk "), "{sources}");
    assert!(
        sources.contains("The SPDX license identifier is Apache-2.0"),
        "/sources shows the text: {sources}"
    );

    // stderr: the modes, the unknown mode, the rag answer's sources; one line per answer
    // with its timings.
    assert!(stderr.contains("unknown mode `foo`"), "{stderr}");
    let timings: Vec<&str> = stderr.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(timings.len(), 2, "{stderr}");
    assert!(timings[0].starts_with("[base;"), "{stderr}");
    assert!(timings[1].starts_with("[rag;"), "{stderr}");
    assert!(
        timings[1].contains("memory 2 of 2 messages"),
        "the rag question is asked with the base turn: {stderr}"
    );
    let sources_line = stderr
        .lines()
        .find(|l| l.starts_with("sources:"))
        .expect("a sources line after the rag answer");
    assert!(sources_line.contains("apache-2.0#"), "{sources_line}");
}

#[test]
fn bench_writes_json_markdown_and_svg_with_the_per_mode_fields() {
    let ix = util::subset_index();
    let tmp = tempfile::tempdir().expect("tmp");
    let out_dir = tmp.path().join("bench");
    let out = ragtune(&ix.index)
        .args([
            "bench",
            "--modes",
            "rag,base,finetune",
            "--warmup",
            "0",
            "--max-tokens",
            "8",
            "--limit",
            "3",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["bench.json", "bench.md", "bench.svg"] {
        assert!(out_dir.join(name).is_file(), "{name} missing: {stderr}");
    }
    let md = std::fs::read_to_string(out_dir.join("bench.md")).expect("md");
    assert_eq!(stdout, md, "the table is printed as written");
    assert!(md.contains("| rag |") && md.contains("| base |"), "{md}");
    let svg = std::fs::read_to_string(out_dir.join("bench.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("accuracy"), "{svg}");

    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("bench.json")).expect("json"))
            .expect("valid JSON");
    assert_eq!(v["settings"]["n_questions"], 3);
    let modes = v["modes"].as_array().expect("modes");
    assert_eq!(
        modes.iter().map(|m| m["mode"].clone()).collect::<Vec<_>>(),
        ["rag", "base", "finetune"]
    );
    // The committed adapter `models/adapters/licenses-lora` is the default, so finetune runs.
    assert_eq!(v["settings"]["adapter"], "licenses-lora");
    for m in modes {
        assert_eq!(m["status"], "ran", "{m}");
        assert_eq!(m["answered"], 3, "{m}");
        for field in [
            "first_token_ms",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "end_to_end_ms",
        ] {
            let median = m[field]["median"].as_f64().expect(field);
            assert!(median > 0.0, "{field}: {m}");
            assert!(
                m[field]["p95"].as_f64().expect(field) >= median,
                "{field}: {m}"
            );
        }
        let acc = &m["accuracy"];
        assert_eq!(acc["all"]["scored"], 3, "{m}");
        assert_eq!(
            acc["seen"]["scored"].as_u64().expect("seen")
                + acc["fresh"]["scored"].as_u64().expect("fresh"),
            3
        );
    }
    assert!(
        modes[0]["retrieval_ms"]["median"]
            .as_f64()
            .expect("rag retrieval")
            > 0.0
    );
    assert!(modes[1]["retrieval_ms"].is_null(), "base does not retrieve");
    assert!(
        modes[2]["retrieval_ms"].is_null(),
        "finetune does not retrieve"
    );
    assert!(md.contains("| finetune |"), "{md}");
    assert_eq!(v["results"].as_array().expect("results").len(), 9);
}

#[test]
fn the_committed_question_set_regenerates_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out_file = tmp.path().join("licenses.jsonl");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_ragtune"))
            .arg("--quiet")
            .args(["bench", "--make-questions"])
            .arg(&out_file)
            .arg("--corpus")
            .arg(util::licenses_dir()),
    );
    let made = std::fs::read(&out_file).expect("made");
    let committed =
        std::fs::read(util::repo().join("benches/questions/licenses.jsonl")).expect("committed");
    assert!(
        made == committed,
        "benches/questions/licenses.jsonl is not what `ragtune bench --make-questions` makes \
         from the pinned LicenseDB: regenerate it (benches/questions/README.md)"
    );
    let set = ragtune::licensedb::questions::parse_jsonl(
        std::str::from_utf8(&committed).expect("utf8"),
        "licenses.jsonl",
    )
    .expect("parse");
    assert_eq!(set.len(), 120);
    for q in &set {
        let key = q.doc_id.as_deref().expect("doc_id");
        assert_eq!(
            q.fresh,
            Some(ragtune::licensedb::is_fresh(key)),
            "{key} is marked wrongly"
        );
        assert!(q.answer.is_some());
    }
    for kind in ragtune::licensedb::questions::Kind::GENERATED {
        for fresh in [false, true] {
            let n = set
                .iter()
                .filter(|q| q.kind == kind && q.fresh == Some(fresh))
                .count();
            assert_eq!(n, 20, "{kind} fresh={fresh}");
        }
    }
}
