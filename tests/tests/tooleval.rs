//! `kiln eval --tool-calls`: greedy replies to a chat test set, scored and written as JSON.

use kiln_tests::*;

#[test]
fn tool_call_eval_generates_scores_and_writes_every_reply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let train = run(&[
        "train",
        "recipes/smoke/qwen2-qlora-tiny.toml",
        "--out",
        out,
        "--stop-after",
        "2",
    ]);
    assert_eq!(train.status.code(), Some(75), "{}", stderr(&train));
    let run_dir = dir.path().join("qwen2-qlora-tiny");
    let run_str = run_dir.to_str().unwrap();

    // The shipped held-out set: 24 rows expect a tool call, 12 a text answer.
    let eval = run(&[
        "eval",
        run_str,
        "--tool-calls",
        "data/toolchat/test.jsonl",
        "--max-new-tokens",
        "24",
    ]);
    assert_ok(&eval);
    let table = stdout(&eval);
    for label in [
        "tool-call rows",
        "format valid",
        "tool name correct",
        "arguments exact match",
        "text-answer rows",
        "exact match",
        "normalized match",
    ] {
        assert!(table.contains(label), "{label} missing:\n{table}");
    }
    let written = run_dir.join("eval/tool-calls-step-00000002.json");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
    assert_eq!(report["rows"], 36);
    assert_eq!(report["tool_call_rows"], 24);
    assert_eq!(report["text_rows"], 12);
    assert_eq!(report["format_valid"]["of"], 24);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 36);
    let first_text = results.iter().find(|r| r["kind"] == "text").unwrap();

    // Greedy decoding is deterministic: a row that expects exactly the reply the model gave
    // scores an exact match, through the same command.
    let reply = first_text["reply"].as_str().unwrap();
    let line = first_text["line"].as_u64().unwrap() as usize;
    let source = std::fs::read_to_string(repo_root().join("data/toolchat/test.jsonl")).unwrap();
    let mut row: serde_json::Value =
        serde_json::from_str(source.lines().nth(line - 1).unwrap()).unwrap();
    let messages = row["messages"].as_array_mut().unwrap();
    *messages.last_mut().unwrap() = serde_json::json!({"role": "assistant", "content": reply});
    let mine = dir.path().join("mine.jsonl");
    std::fs::write(&mine, format!("{row}\n")).unwrap();
    let json = dir.path().join("mine.json");
    let again = run(&[
        "eval",
        run_str,
        "--tool-calls",
        mine.to_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&again);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["exact_match"]["passed"], 1, "{report}");
    assert_eq!(report["normalized_match"]["passed"], 1, "{report}");

    // A row without an expected assistant turn is named by file and line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{row}\n{}\n",
            r#"{"messages": [{"role": "user", "content": "Hi"}]}"#
        ),
    )
    .unwrap();
    let err = run(&["eval", run_str, "--tool-calls", bad.to_str().unwrap()]);
    assert_eq!(err.status.code(), Some(1));
    assert!(
        stderr(&err).contains("bad.jsonl:2: the last message must be the expected assistant turn"),
        "{}",
        stderr(&err)
    );
}
