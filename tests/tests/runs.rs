//! `kiln runs` lists runs with their status read from the run directory, `kiln completions`
//! and `kiln man` print what shells and `man` read.

use kiln_tests::*;

#[test]
fn runs_lists_status_progress_and_checkpoints_and_spots_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let train = run(&[
        "train",
        "recipes/smoke/moa-tiny.toml",
        "--out",
        out,
        "--stop-after",
        "3",
    ]);
    assert_eq!(train.status.code(), Some(75), "{}", stderr(&train));
    // A copy whose status says running, written by a process that cannot exist (pids stop
    // at 2^22 on Linux): a crash that never said so.
    let crashed = dir.path().join("moa-crashed");
    std::fs::create_dir_all(crashed.join("checkpoints")).unwrap();
    for f in ["recipe.resolved.toml", "metrics.jsonl"] {
        std::fs::copy(dir.path().join("moa-tiny").join(f), crashed.join(f)).unwrap();
    }
    std::fs::write(
        crashed.join("status.json"),
        r#"{"status": "running", "step": 2, "pid": 4194305, "updated_unix_s": 0}"#,
    )
    .unwrap();

    let table = run(&["runs", out]);
    assert_ok(&table);
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("RUN") && lines[0].contains("BEST EVAL"),
        "{text}"
    );
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let tiny = row("moa-tiny");
    assert_eq!(&tiny[1..5], ["moa", "flex", "interrupted", "3"], "{text}");
    assert_eq!(tiny.last(), Some(&"step-00000003"), "{text}");
    let gone = row("moa-crashed");
    assert_eq!(gone[3], "crashed", "{text}");
    assert_eq!(gone.last(), Some(&"-"), "no checkpoint:\n{text}");

    // The JSON agrees with the metrics file.
    let json = run(&["runs", out, "--json"]);
    assert_ok(&json);
    let rows: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let metrics = std::fs::read_to_string(dir.path().join("moa-tiny/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        metrics
            .lines()
            .rfind(|l| l.contains("\"kind\":\"train\""))
            .unwrap(),
    )
    .unwrap();
    let tiny = rows.iter().find(|r| r["name"] == "moa-tiny").unwrap();
    assert_eq!(tiny["last_loss"], last["loss"]);
    assert_eq!(tiny["tokens"], last["trained_tokens"]);

    // One run directory lists itself; a missing directory is a clear error.
    let single = run(&["runs", crashed.to_str().unwrap()]);
    assert_eq!(stdout(&single).lines().count(), 2, "{}", stdout(&single));
    let missing = run(&["runs", dir.path().join("nope").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("is not a directory"));
}

#[test]
fn completions_and_man_page_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert_ok(&out);
        let script = stdout(&out);
        for sub in ["train", "resume", "runs", "bench", "generate"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let man = run(&["man"]);
    assert_ok(&man);
    let page = stdout(&man);
    assert!(
        page.contains(".TH kiln 1") && page.contains("kiln\\-runs"),
        "{page}"
    );
}
