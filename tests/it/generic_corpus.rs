//! A second corpus through the same commands: the Markdown handbook in
//! `tests/corpus/handbook/` (a fictional project's pages with `title`/`team` front matter),
//! once with the built-in `generic` profile and once with the user profile file
//! `tests/corpus/handbook.toml`.

use std::path::{Path, PathBuf};

use crate::util::{self, ragtune, run_ok, run_with_stdin};

fn handbook() -> PathBuf {
    util::repo().join("tests/corpus/handbook")
}

fn profile_file() -> String {
    util::repo()
        .join("tests/corpus/handbook.toml")
        .display()
        .to_string()
}

/// `ragtune --profile PROFILE ...` on `index`.
fn with_profile(index: &Path, profile: &str) -> std::process::Command {
    let mut cmd = ragtune(index);
    cmd.args(["--profile", profile]);
    cmd
}

fn search(index: &Path, profile: &str, query: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(
        with_profile(index, profile)
            .args(["search", query, "-k", "3", "--format", "json"])
            .args(extra),
    );
    serde_json::from_slice(&out.stdout).expect("search JSON")
}

fn top_doc(hits: &serde_json::Value) -> &str {
    hits["hits"][0]["doc_id"].as_str().expect("a hit")
}

#[test]
fn a_markdown_folder_goes_through_ingest_search_ask_and_chat_with_the_generic_profile() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    let out = run_ok(
        with_profile(&index, "generic")
            .arg("ingest")
            .arg(handbook()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The generic profile skips nothing: the draft is indexed too.
    assert!(stderr.contains("indexed 6 documents"), "{stderr}");

    for (query, doc) in [
        (
            "How many approvals does a pull request need?",
            "code-review",
        ),
        ("When is the release branch cut?", "releases"),
        ("What is the daily meal allowance?", "expenses"),
        (
            "How quickly must the on-call engineer answer a page?",
            "on-call",
        ),
    ] {
        let hits = search(&index, "generic", query, &[]);
        assert_eq!(top_doc(&hits), doc, "{query}: {hits}");
    }
    // Any front-matter field filters under the generic profile.
    let hits = search(
        &index,
        "generic",
        "How are releases signed?",
        &["--filter", "team=Security"],
    );
    assert_eq!(top_doc(&hits), "security", "{hits}");
    assert!(hits["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .all(|h| h["doc_id"] == "security"));

    // ask in rag mode: the right page among the sources, and every citation names one.
    let out = run_ok(with_profile(&index, "generic").args([
        "ask",
        "How many approvals does a pull request need?",
        "--mode",
        "rag",
        "--max-tokens",
        "32",
        "--format",
        "json",
    ]));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ask JSON");
    let sources = answer["sources"].as_array().expect("sources");
    assert!(
        sources.iter().any(|s| s["doc_id"] == "code-review"),
        "{answer}"
    );
    assert!(
        !answer["answer"].as_str().expect("answer").trim().is_empty(),
        "{answer}"
    );
    // Citations map to the sources given; numbers beyond them are flagged, not dropped.
    for c in answer["citations"].as_array().expect("citations") {
        let n = c["number"].as_u64().expect("number") as usize;
        let given = (1..=sources.len()).contains(&n);
        assert_eq!(c["valid"], given, "{answer}");
        if given {
            assert_eq!(c["doc_id"], sources[n - 1]["doc_id"], "{answer}");
        }
    }
    // The shipped adapter records the LicenseDB profile: loading it under another profile
    // says so.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if util::fetch_config()
        .models_dir
        .join("adapters/licenses-lora/train_summary.json")
        .is_file()
    {
        assert!(
            stderr.contains("was trained for profile `licensedb` (running: `generic`)"),
            "{stderr}"
        );
    }

    // The chat, from a pipe: two questions, two answers, then the sources of the last.
    let script = [
        "When is the release branch cut?",
        "Who acknowledges a vulnerability report?",
        "/sources",
        "/quit",
    ];
    let out = run_with_stdin(
        with_profile(&index, "generic").args([
            "chat",
            "--mode",
            "rag",
            "--max-tokens",
            "24",
            "--no-history-file",
        ]),
        script.join("\n").as_bytes(),
    );
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let stderr = String::from_utf8(out.stderr).expect("utf8");
    assert!(out.status.success(), "{stderr}");
    let (answers, listing) = stdout
        .split_once("\n[1] ")
        .unwrap_or_else(|| panic!("no /sources listing in {stdout:?}"));
    assert!(answers.lines().count() >= 2, "{stdout:?}");
    assert!(
        listing.contains("security") || stdout.contains("] security"),
        "{stdout}"
    );
    assert_eq!(stderr.matches("first token").count(), 2, "{stderr}");
}

#[test]
fn a_profile_file_sets_the_record_the_filter_fields_and_the_skip_rules() {
    let tmp = tempfile::tempdir().expect("tmp");
    let index = tmp.path().join("index");
    let profile = profile_file();
    let out = run_ok(with_profile(&index, &profile).arg("ingest").arg(handbook()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("draft-roadmap.md") && stderr.contains("draft page (draft: yes)"),
        "{stderr}"
    );
    assert!(stderr.contains("indexed 5 documents"), "{stderr}");

    // The metadata record in the profile's words.
    let hits = search(&index, &profile, "Which team owns code review?", &[]);
    let record = hits["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .find(|h| h["doc_id"] == "code-review" && h["chunk"] == 0)
        .unwrap_or_else(|| panic!("no record chunk of code-review in {hits}"));
    assert_eq!(
        record["text"],
        "Code review (handbook page code-review). The owning team is Platform."
    );

    // `team` is filterable; `title` is not, and the error lists what is.
    let hits = search(
        &index,
        &profile,
        "approvals",
        &["--filter", "team=Platform"],
    );
    assert_eq!(top_doc(&hits), "code-review");
    let out = with_profile(&index, &profile)
        .args(["search", "approvals", "--filter", "title=Code review"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown filter field `title`: filter on one of team"),
        "{stderr}"
    );

    // A profile name that is neither built in nor a file.
    let out = with_profile(&index, "no-such-profile")
        .args(["search", "approvals"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown profile `no-such-profile`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
