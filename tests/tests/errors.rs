//! Bad input gets a clear error naming the file, key, line or row, never a panic.

use std::path::Path;

use kiln_tests::*;

/// Runs `kiln` and returns its stderr, asserting a clean failure (exit 1, no panic).
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "expected exit status 1:\n{err}");
    assert!(!err.contains("panicked"), "kiln panicked:\n{err}");
    err
}

/// A small recipe over one source, written into `dir`.
fn recipe_with_source(dir: &Path, source: &str, extra_phase: &str) -> String {
    let text = format!(
        r#"[run]
name = "bad"
out_dir = "{out}"

[model]
family = "qwen2"

[model.qwen2]
vocab_size = 260
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 128

[data]

[[data.sources]]
{source}

[[phases]]
sources = {{ only = 1.0 }}
batch_size = 2
window = 16
steps = 2
{extra_phase}
"#,
        out = dir.join("runs").display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn unknown_key_names_file_and_dotted_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a.txt");
    std::fs::write(&data, "hello world").unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"text\"\npath = \"{}\"",
            data.display()
        ),
        "windw = 32",
    );
    let err = fails(&["train", &recipe]);
    assert!(
        err.contains("recipe.toml") && err.contains("phases[0]") && err.contains("windw"),
        "{err}"
    );
    assert!(
        err.contains("expected one of"),
        "the message lists the valid keys:\n{err}"
    );
}

#[test]
fn validation_lists_every_error_with_its_key() {
    let err = fails(&[
        "train",
        SMOKE,
        "--set",
        "phases[1].window=4096",
        "--set",
        "optim.lr=-1",
        "--set",
        "phases[0].sources.typo=1.0",
    ]);
    assert!(err.contains("recipe has 4 errors"), "{err}");
    assert!(
        err.contains(
            "recipes/smoke/qwen2-tiny.toml: phases[1].window: 4096 exceeds model max_position 512"
        ),
        "{err}"
    );
    assert!(err.contains("optim.lr: -1 must be positive"), "{err}");
    assert!(
        err.contains("phases[0].sources.typo: no source named `typo`"),
        "{err}"
    );
}

#[test]
fn wrong_type_and_bad_override_syntax() {
    let err = fails(&["inspect", SMOKE, "--set", "phases[0].batch_size=\"eight\""]);
    assert!(
        err.contains("phases[0].batch_size") && err.contains("invalid type"),
        "{err}"
    );
    let err = fails(&["inspect", SMOKE, "--set", "optim.lr"]);
    assert!(
        err.contains("--set `optim.lr`: expected `key=value`"),
        "{err}"
    );
    let err = fails(&["inspect", SMOKE, "--set", "phases[7].window=3"]);
    assert!(err.contains("`phases` has 2 entries, no index 7"), "{err}");
}

#[test]
fn malformed_jsonl_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"text\": \"broken\n").unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"jsonl\"\npath = \"{}\"",
            data.display()
        ),
        "",
    );
    let err = fails(&["train", &recipe]);
    assert!(err.contains("rows.jsonl:2: malformed JSON"), "{err}");
}

#[test]
fn missing_jsonl_field_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rows.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n\n{\"body\": \"no text\"}\n").unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"jsonl\"\npath = \"{}\"",
            data.display()
        ),
        "",
    );
    let err = fails(&["train", &recipe]);
    assert!(err.contains("rows.jsonl:3: missing field `text`"), "{err}");
    std::fs::write(&data, "{\"text\": 7}\n").unwrap();
    let err = fails(&["train", &recipe, "--overwrite"]);
    assert!(
        err.contains("rows.jsonl:1") && err.contains("field `text` is a number, expected a string"),
        "{err}"
    );
}

#[test]
fn non_utf8_text_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("latin1.txt");
    std::fs::write(&data, b"first line\nsecond \xe9t\xe9\n").unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"text\"\npath = \"{}\"",
            data.display()
        ),
        "",
    );
    let err = fails(&["train", &recipe]);
    assert!(err.contains("latin1.txt:2: not valid UTF-8"), "{err}");
}

#[test]
fn empty_and_missing_sources() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"text\"\npath = \"{}\"",
            empty.display()
        ),
        "",
    );
    let err = fails(&["train", &recipe]);
    assert!(
        err.contains("source `only`") && err.contains("holds no documents"),
        "{err}"
    );
    let blank = dir.path().join("blank.txt");
    std::fs::write(&blank, "\n\n   \n").unwrap();
    let recipe = recipe_with_source(
        dir.path(),
        &format!(
            "name = \"only\"\nformat = \"text\"\npath = \"{}\"",
            blank.display()
        ),
        "",
    );
    let err = fails(&["train", &recipe, "--overwrite"]);
    assert!(err.contains("holds no documents"), "{err}");
    let recipe = recipe_with_source(
        dir.path(),
        "name = \"only\"\nformat = \"text\"\npath = \"no/such/dir\"",
        "",
    );
    let err = fails(&["train", &recipe, "--overwrite"]);
    assert!(
        err.contains("data.sources[0].path: `no/such/dir`: not found"),
        "{err}"
    );
}

#[test]
fn vocabulary_smaller_than_the_tokenizer_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let err = fails(&[
        "train",
        SMOKE,
        "--out",
        out,
        "--set",
        "model.qwen2.vocab_size=100",
    ]);
    assert!(
        err.contains("model.qwen2.vocab_size") && err.contains("100") && err.contains("260"),
        "{err}"
    );
}

/// The default build (the one the tests run) has no CUDA backend.
#[test]
fn cuda_without_cuda_support_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let err = fails(&[
        "train",
        SMOKE,
        "--out",
        out,
        "--set",
        "run.backend=cuda",
        "--set",
        "run.device=cuda:0",
    ]);
    assert!(
        err.contains("built without CUDA support") && err.contains("--features cuda"),
        "{err}"
    );
    let err = fails(&["inspect", SMOKE, "--set", "run.backend=cuda"]);
    assert!(
        err.contains("run.device: `cpu` is not a CUDA device"),
        "{err}"
    );
}

/// The default build has no wgpu backend either; a wgpu recipe names a wgpu device.
#[test]
fn wgpu_without_wgpu_support_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let err = fails(&[
        "train",
        SMOKE,
        "--out",
        out,
        "--set",
        "run.backend=wgpu",
        "--set",
        "run.device=default",
    ]);
    assert!(
        err.contains("built without wgpu support") && err.contains("--features wgpu"),
        "{err}"
    );
    let err = fails(&["doctor", "--backend", "wgpu"]);
    assert!(err.contains("built without wgpu support"), "{err}");
    let err = fails(&["inspect", SMOKE, "--set", "run.backend=wgpu"]);
    assert!(
        err.contains("run.device: `cpu` is not a wgpu device") && err.contains("software"),
        "{err}"
    );
}

/// QLoRA on CUDA trains wrongly (docs/performance.md): kiln refuses it before building a
/// model, in `kiln train` and `kiln bench` alike, and says what works instead.
#[test]
fn qlora_training_on_cuda_is_refused_with_the_alternatives() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let err = fails(&[
        "train",
        "recipes/smoke/qwen2-qlora-tiny.toml",
        "--out",
        out,
        "--set",
        "run.backend=cuda",
        "--set",
        "run.device=cuda:0",
    ]);
    assert!(
        err.contains("QLoRA training on CUDA computes wrong gradients")
            && err.contains("--set adapter.kind=lora")
            && err.contains("--set run.backend=flex"),
        "{err}"
    );
    // The 7B benchmark recipe is refused the same way, before its 7.6B weights are drawn.
    let err = fails(&["bench", "recipes/bench/qwen2.5-7b-qlora-bench.toml"]);
    assert!(err.contains("QLoRA training on CUDA"), "{err}");
    // LoRA on CUDA is not refused: this build has no CUDA, which is the error it gets.
    let err = fails(&[
        "train",
        "recipes/smoke/qwen2-qlora-tiny.toml",
        "--out",
        out,
        "--set",
        "run.backend=cuda",
        "--set",
        "run.device=cuda:0",
        "--set",
        "adapter.kind=lora",
    ]);
    assert!(err.contains("built without CUDA support"), "{err}");
}

#[test]
fn resume_of_something_that_is_not_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&["resume", dir.path().to_str().unwrap()]);
    assert!(err.contains("is not a run directory"), "{err}");
}

#[test]
fn a_reader_that_stops_early_gets_no_panic() {
    use std::process::Stdio;
    // `kiln inspect RECIPE | head -0`: the pipe is closed before kiln writes.
    let mut child = kiln(&["inspect", "recipes/smoke/qwen2-tiny.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
}

#[test]
fn missing_recipe_is_named_once_with_its_cause() {
    let err = fails(&["train", "no/such/recipe.toml"]);
    assert!(
        err.contains("cannot read recipe `no/such/recipe.toml`"),
        "{err}"
    );
    // The library error already quotes its io cause; the CLI must not repeat it.
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}
