//! Hugging Face tokenizers and chat data through the CLI: `kiln tokenizer train`, training
//! with `[tokenizer] kind = "hf"`, and chat SFT with assistant-only loss.

use kiln_tests::*;

#[test]
fn trained_tokenizer_drives_a_training_run() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok/tokenizer.json");
    let result = run(&[
        "tokenizer",
        "train",
        SMOKE,
        "--vocab-size",
        "400",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert_ok(&result);
    assert!(tok.is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    assert_eq!(json["model"]["type"], "BPE");
    let path = format!("tokenizer.path={}", toml_str(&tok));
    let mut args = tiny_train_args(dir.path().to_str().unwrap(), &[]);
    args.extend_from_slice(&[
        "--set",
        "tokenizer.kind=hf",
        "--set",
        &path,
        "--set",
        "model.qwen2.vocab_size=400",
    ]);
    assert_ok(&run(&args));
    let l = losses(&dir.path().join("qwen2-tiny"));
    assert!(l[0].1 > 5.5 && l.last().unwrap().1 < l[0].1, "{l:?}");
    // The vocabulary must cover the tokenizer.
    let small = run(&[
        "inspect",
        SMOKE,
        "--set",
        "tokenizer.kind=hf",
        "--set",
        &path,
        "--set",
        "model.qwen2.vocab_size=300",
    ]);
    assert_eq!(small.status.code(), Some(1));
    assert!(
        stderr(&small)
            .contains("model.qwen2.vocab_size: 300 is smaller than the tokenizer's 400 ids"),
        "{}",
        stderr(&small)
    );
}

fn toml_str(p: &std::path::Path) -> String {
    format!("\"{}\"", p.display())
}

#[test]
fn chat_sft_trains_only_on_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let chat = repo_root().join("tests/fixtures/chat");
    let recipe = dir.path().join("chat.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"# Chat SFT on the golden-test conversations.
[run]
name = "chat"
out_dir = "{out}"

[model]
family = "qwen2"

[model.qwen2]
vocab_size = 600
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1

[tokenizer]
kind = "hf"
path = "{chat}"

[data]
eval_holdout = 0.0

[[data.sources]]
name = "chat"
format = "jsonl"
path = "{chat}/conversations.jsonl"
messages_field = "messages"

[[phases]]
sources = {{ chat = 1.0 }}
batch_size = 2
window = 128
windowing = "belt"
steps = 8

[optim]
lr = 3e-3
"#,
            out = dir.path().display(),
            chat = chat.display()
        ),
    )
    .unwrap();
    let inspect = run(&["inspect", recipe.to_str().unwrap()]);
    assert_ok(&inspect);
    let result = run(&["train", recipe.to_str().unwrap()]);
    assert_ok(&result);
    // The export carries the tokenizer and its chat template.
    let export = dir.path().join("export");
    assert_ok(&run(&[
        "export",
        dir.path().join("chat").to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        assert!(export.join(f).is_file(), "export lacks {f}");
    }
    let rows = metrics(&dir.path().join("chat"));
    let last = rows.iter().rfind(|r| r["kind"] == "train").unwrap();
    let tokens = last["tokens"].as_u64().unwrap();
    let trained = last["trained_tokens"].as_u64().unwrap();
    assert!(
        trained > 0 && trained * 3 < tokens,
        "assistant-only loss: {trained} of {tokens} positions trained"
    );
}

#[test]
fn malformed_chat_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let mut args = tiny_train_args(dir.path().to_str().unwrap(), &[]);
    let src = format!("data.sources[1].path={}", toml_str(&rows));
    args.extend_from_slice(&[
        "--set",
        &src,
        "--set",
        "data.sources[1].messages_field=messages",
    ]);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("rows.jsonl:2: message 0: unknown role `robot`"),
        "{err}"
    );
}
