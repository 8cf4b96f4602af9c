//! The binary under careless and hostile use (issue: reliability): concurrent writers, closed
//! pipes, unreadable stdin lines, out-of-range values, an adapter that would be overwritten,
//! and temporary files left by a crashed writer. Each test failed before its fix.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::{self, assert_ok, copy_subset_index, ragtune, run_ok, run_with_stdin};

fn documents(index: &Path) -> u64 {
    util::index_info(index)["documents"]
        .as_u64()
        .expect("documents")
}

/// Two `ingest --add` processes started together both land: the writer lock serialises
/// their commits (before it, the later committer's stale manifest dropped the other's
/// segment in 3 of 5 trials).
#[test]
fn concurrent_ingest_add_keeps_both_documents() {
    let tmp = tempfile::tempdir().expect("tmp");
    for trial in 0..2 {
        let index = tmp.path().join(format!("index-{trial}"));
        copy_subset_index(&index);
        let before = documents(&index);
        let mut children = Vec::new();
        for key in ["afl-3.0", "bsd-2-clause-views"] {
            let corpus = tmp.path().join(format!("corpus-{trial}-{key}"));
            util::copy_subset(&corpus, &[key]);
            children.push(
                ragtune(&index)
                    .args(["ingest", "--add"])
                    .arg(&corpus)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn"),
            );
        }
        for child in children {
            assert_ok(&child.wait_with_output().expect("wait"));
        }
        assert_eq!(documents(&index), before + 2, "trial {trial}");
    }
}

/// `| head` closes stdout early: the command ends quietly with status 0, never a panic
/// (exit 101) or an error (exit 1).
#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let index = &util::subset_index().index;
    let cases: [(&[&str], &str); 3] = [
        (&["index", "info"], ""),
        (
            &["search", "--format", "json", "-k", "2"],
            "MIT\nzlib\nApache\n",
        ),
        (&["embed"], "one\ntwo\nthree\n"),
    ];
    for (args, input) in cases {
        let mut child = ragtune(index)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        // Close the read end before the command writes anything.
        drop(child.stdout.take());
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("stderr");
        let status = child.wait().expect("wait");
        assert!(status.success(), "{args:?}: {status}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// One line that is not UTF-8 gets an error line with its number; the lines after it still
/// run; the exit status is non-zero at the end (`search`, `embed`, `ask`; `chat` reads its
/// lines through the same reader).
#[test]
fn an_unreadable_stdin_line_fails_alone() {
    let index = &util::subset_index().index;
    let input: &[u8] = b"MIT License\n\xff\xfe broken\nzlib license\n";
    for args in [
        &["search", "--format", "json", "-k", "2"][..],
        &["embed"][..],
        &[
            "ask",
            "--format",
            "json",
            "--mode",
            "rag",
            "--max-tokens",
            "4",
        ][..],
    ] {
        let out = run_with_stdin(ragtune(index).args(args), input);
        assert!(
            !out.status.success(),
            "{args:?}: a failed line must fail the batch"
        );
        let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
        let lines = util::json_lines(stdout.as_bytes());
        assert_eq!(
            lines.len(),
            3,
            "{args:?}: one output line per input line: {stdout}"
        );
        let error = lines[1]["error"].as_str().expect("an error line");
        assert!(
            error.contains("line 2") && error.contains("not valid UTF-8"),
            "{args:?}: {error}"
        );
        assert!(
            lines[0]["error"].is_null() && lines[2]["error"].is_null(),
            "{args:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("line 2"), "{args:?}: {stderr}");
    }
}

/// Out-of-range values are refused with a message instead of silently doing something else.
#[test]
fn out_of_range_values_are_refused() {
    let index = &util::subset_index().index;
    let cases: [(&[&str], &str); 6] = [
        (&["search", "--ef", "0", "MIT"], "--ef"),
        (
            &["search", "--ef", "3", "-k", "5", "MIT"],
            "smaller than -k",
        ),
        (&["search", "-k", "100000", "MIT"], "out of range"),
        (&["ask", "--temperature", "nan", "MIT?"], "finite"),
        (&["ask", "--temperature=-1", "MIT?"], "finite"),
        (&["index", "delete", "no-such-license"], "not in the index"),
    ];
    for (args, needle) in cases {
        let stderr = util::run_err(ragtune(index).args(args));
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `finetune --out` on a trained adapter is refused without `--overwrite`, and nothing in
/// it changes (a 1-step run used to replace the shipped adapter's weights and log).
#[test]
fn finetune_refuses_to_replace_a_trained_adapter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out_dir = tmp.path().join("adapter");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let shipped = util::repo().join("models/adapters/licenses-lora");
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(shipped.join(name), out_dir.join(name)).expect("copy");
    }
    let data = tmp.path().join("train.jsonl");
    std::fs::write(
        &data,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
    )
    .expect("write");
    let before = std::fs::read(out_dir.join("adapter_model.safetensors")).expect("read");
    let stderr = util::run_err(
        ragtune(tmp.path())
            .args(["finetune", "--max-steps", "1", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out_dir),
    );
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(
        std::fs::read(out_dir.join("adapter_model.safetensors")).expect("read"),
        before
    );
}

/// A temporary file left by a writer that crashed (its pid is gone) is swept by the next
/// update; the index is unharmed.
#[test]
fn stale_temporary_files_are_swept_by_the_next_update() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    copy_subset_index(&index);
    // pid 0 is never a running user process.
    let stale = index.join("seg-000099.vectors.0-7.tmp");
    std::fs::write(&stale, vec![0u8; 4096]).expect("write");
    let before = documents(&index);
    run_ok(ragtune(&index).args(["index", "delete", "zlib"]));
    assert!(!stale.exists(), "the stale temporary file is swept");
    assert_eq!(documents(&index), before - 1);
}

/// Every command resolves its settings the same way (flags > environment > ragtune.toml >
/// defaults): `index`, `models_dir` and `gguf` from the file are honoured by `index`,
/// `search`, `ingest` and `generate`; a file that is not TOML fails every command; a
/// `default_adapter` that names nothing is an error, not ignored.
#[test]
fn every_command_honours_the_configuration_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("configured-index");
    copy_subset_index(&index);
    let models = util::fetch_config().models_dir;
    let config = tmp.path().join("ragtune.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            format!(
                "models_dir = {:?}\nindex = {:?}\n{extra}",
                models.display().to_string(),
                index.display().to_string()
            ),
        )
        .expect("write config");
    };
    write_config("");
    // Run from an empty working directory, so no default path could be the one used.
    let work = tmp.path().join("cwd");
    std::fs::create_dir_all(&work).expect("mkdir");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ragtune"));
        c.current_dir(&work)
            .env_remove("RAGTUNE_INDEX")
            .env_remove("RAGTUNE_MODELS")
            .arg("--quiet")
            .arg("--config")
            .arg(&config)
            .args(args);
        c
    };
    let out = run_ok(&mut cmd(&["index", "info"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["path"], index.display().to_string());

    let out = run_ok(&mut cmd(&[
        "search",
        "--format",
        "json",
        "-k",
        "1",
        "zlib license",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["hits"][0]["doc_id"], "zlib");

    let corpus = tmp.path().join("more");
    util::copy_subset(&corpus, &["afl-3.0"]);
    let before = documents(&index);
    run_ok(&mut cmd(&[
        "ingest",
        "--add",
        corpus.to_str().expect("utf-8"),
    ]));
    assert_eq!(
        documents(&index),
        before + 1,
        "ingest --add wrote the configured index"
    );
    assert!(!work.join("index").exists() && !work.join("models").exists());

    write_config("gguf = \"/nonexistent/model.gguf\"\n");
    let stderr = util::run_err(&mut cmd(&["generate", "--max-tokens", "1", "hello"]));
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");

    write_config("default_adapter = \"nope\"\n");
    let stderr = util::run_err(&mut cmd(&["ask", "--mode", "rag", "What is MIT?"]));
    assert!(stderr.contains("nope"), "{stderr}");

    std::fs::write(&config, [0xffu8, 0xfe, 0x00, 0x13, 0x37]).expect("write");
    for args in [&["search", "MIT"][..], &["index", "info"][..]] {
        let stderr = util::run_err(&mut cmd(args));
        assert!(stderr.contains("ragtune.toml"), "{args:?}: {stderr}");
    }
}

/// An empty file is skipped with its reason, not counted as indexed; a chat session in which
/// every question failed exits non-zero (it exited 0).
#[test]
fn empty_files_are_skipped_and_an_all_failed_chat_fails() {
    let tmp = tempfile::tempdir().expect("tmp");
    let corpus = tmp.path().join("corpus");
    util::copy_subset(&corpus, &["zlib"]);
    std::fs::write(corpus.join("empty.md"), "").expect("write");
    let index = tmp.path().join("index");
    let out = run_ok(ragtune(&index).arg("ingest").arg(&corpus));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("empty.md") && stderr.contains("empty file"),
        "{stderr}"
    );
    assert!(stderr.contains("indexed 1 documents"), "{stderr}");
    assert_eq!(documents(&index), 1);

    let out = run_with_stdin(
        ragtune(&index).args(["chat", "--mode", "rag", "--no-history-file"]),
        b"\xff\xfe\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "every question failed: {stderr}");
    assert!(stderr.contains("line 1 is not valid UTF-8"), "{stderr}");
}

/// `ingest --add` into an index that a first run has indexed the metadata records of only
/// (its `<index>.partial` marker beside it) is refused, saying what to run: the full ingest
/// that completes it replaces the whole index, and would drop what was added.
#[test]
fn adding_to_a_records_only_index_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("licensedb");
    copy_subset_index(&index);
    let before = documents(&index);
    std::fs::write(ragtune::ingest::partial_marker(&index), "records only\n").expect("marker");
    let corpus = tmp.path().join("corpus");
    util::copy_subset(&corpus, &["afl-3.0"]);
    let out = ragtune(&index)
        .args(["ingest", "--add"])
        .arg(&corpus)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains("metadata records only") && stderr.contains("ragtune ingest"),
        "{stderr}"
    );
    assert_eq!(documents(&index), before);
}
