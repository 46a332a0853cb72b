//! `kiln generate` from a Hugging Face model directory and from a run directory.
//! (Token-for-token parity with transformers' `generate` is tested in
//! `crates/kiln-models/tests/generate_parity.rs`.)

use kiln_tests::*;

const MODEL: &str = "tests/fixtures/qwen2/roundtrip";

#[test]
fn greedy_is_deterministic_and_sampling_follows_the_seed() {
    let greedy = |_: u32| {
        let out = run(&[
            "generate",
            MODEL,
            "--prompt",
            "The kiln",
            "--max-new-tokens",
            "24",
        ]);
        assert_ok(&out);
        assert!(stderr(&out).contains("new tokens at"), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(greedy(0), greedy(1));
    let sample = |seed: &str| {
        let out = run(&[
            "generate",
            MODEL,
            "--prompt",
            "The kiln",
            "--max-new-tokens",
            "24",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--backend",
            "ndarray",
        ]);
        assert_ok(&out);
        stdout(&out)
    };
    assert_eq!(sample("1"), sample("1"), "a seed reproduces a sample");
    assert_ne!(
        sample("1"),
        sample("2"),
        "different seeds give different samples"
    );
}

#[test]
fn chat_with_tools_prints_json_from_a_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let first = run(&tiny_train_args(out, &["--stop-after", "2"]));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let tools = dir.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#,
    )
    .unwrap();
    let run_dir = dir.path().join("qwen2-tiny");
    let result = run(&[
        "generate",
        run_dir.to_str().unwrap(),
        "--prompt",
        "Weather in Oslo?",
        "--tools",
        tools.to_str().unwrap(),
        "--max-new-tokens",
        "8",
    ]);
    assert_ok(&result);
    let json: serde_json::Value = serde_json::from_str(&stdout(&result)).expect("JSON on stdout");
    assert!(json["reply"].is_string());
    assert!(json["tool_calls"].is_array() && json["tool_call_errors"].is_array());
}

#[test]
fn bad_targets_and_tool_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate", dir.path().to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("neither a run directory"),
        "{}",
        stderr(&out)
    );
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, "{\"not\": \"an array\"}").unwrap();
    let out = run(&[
        "generate",
        MODEL,
        "--prompt",
        "x",
        "--tools",
        tools.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("expected a JSON array of tool definitions"),
        "{}",
        stderr(&out)
    );
    let out = run(&["generate", MODEL, "--prompt", "x", "--top-p", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("top_p"), "{}", stderr(&out));
}
