//! Hugging Face model directories through the CLI: training from `hf_dir`, `kiln export`,
//! and clear errors for broken directories (missing files, truncated or malformed
//! safetensors, wrong dtype, shape mismatch, missing and unused tensors).

use std::path::{Path, PathBuf};

use kiln_tests::*;

const FINETUNE: &str = "recipes/smoke/qwen2-hf-finetune.toml";

/// Copies a fixture model directory into `dst`.
fn copy_fixture(name: &str, dst: &Path) -> PathBuf {
    let src = repo_root().join("tests/fixtures/qwen2").join(name);
    let out = dst.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    out
}

/// Replaces `from` by `to` (same length) inside a file.
fn patch(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("`{from}` not in {}", path.display()));
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// `kiln train` of the fine-tune recipe on `hf_dir`; returns stderr of a failure.
fn train_fails(out: &Path, hf_dir: &Path) -> String {
    let hf = format!("model.qwen2.hf_dir=\"{}\"", hf_dir.display());
    let result = run(&[
        "train",
        FINETUNE,
        "--out",
        out.to_str().unwrap(),
        "--set",
        &hf,
        "--overwrite",
    ]);
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "expected a failure:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn fine_tuning_starts_from_the_pretrained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert_ok(&run(&["train", FINETUNE, "--out", out]));
    let pretrained = losses(&dir.path().join("qwen2-hf-finetune"));
    let random = {
        let r = run(&[
            "train",
            FINETUNE,
            "--out",
            out,
            "--set",
            "run.name=random",
            "--set",
            "model.qwen2.init=\"random\"",
        ]);
        assert_ok(&r);
        losses(&dir.path().join("random"))
    };
    // A random 260-way model starts near ln(260) = 5.56; the pretrained one far lower.
    assert!(random[0].1 > 5.0, "random init starts at {}", random[0].1);
    assert!(
        pretrained[0].1 < 4.0,
        "pretrained init starts at {}",
        pretrained[0].1
    );
}

#[test]
fn export_writes_a_loadable_sharded_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let first = run(&tiny_train_args(
        out,
        &["--set", "run.name=exp", "--stop-after", "4"],
    ));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let export = dir.path().join("export");
    let result = run(&[
        "export",
        dir.path().join("exp").to_str().unwrap(),
        "--format",
        "hf",
        "--out",
        export.to_str().unwrap(),
        "--max-shard-size",
        "20KB",
    ]);
    assert_ok(&result);
    assert!(
        export.join("model.safetensors.index.json").is_file(),
        "{}",
        stdout(&result)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "qwen2");
    assert_eq!(config["hidden_size"], 32);
    assert_eq!(config["tie_word_embeddings"], true);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(export.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.layers.1.mlp.down_proj.weight"));
    assert!(
        !map.contains_key("lm_head.weight"),
        "a tied head is not written"
    );

    // The export trains again through `hf_dir`, from where the run stopped.
    let hf = format!("model.qwen2.hf_dir=\"{}\"", export.display());
    let again = run(&[
        "train",
        FINETUNE,
        "--out",
        out,
        "--set",
        &hf,
        "--set",
        "run.name=again",
    ]);
    assert_ok(&again);
}

/// A sharded export (tiny shards) of a briefly trained byte-vocabulary model.
fn sharded_export(dir: &Path) -> PathBuf {
    let out = dir.to_str().unwrap();
    let first = run(&tiny_train_args(
        out,
        &["--set", "run.name=shard", "--stop-after", "2"],
    ));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let export = dir.join("shard-export");
    assert_ok(&run(&[
        "export",
        dir.join("shard").to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
        "--max-shard-size",
        "20KB",
    ]));
    export
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = copy_fixture("roundtrip", dir.path());
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("model.safetensors") && err.contains("not found"),
        "{err}"
    );
    std::fs::remove_file(m.join("config.json")).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("config.json") && err.contains("not found"),
        "{err}"
    );
    let s = sharded_export(dir.path());
    std::fs::remove_file(s.join("model-00002-of-00006.safetensors")).unwrap();
    let err = train_fails(dir.path(), &s);
    assert!(
        err.contains("model-00002-of-00006.safetensors") && err.contains("listed in"),
        "{err}"
    );
}

#[test]
fn truncated_and_malformed_safetensors_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let m = copy_fixture("roundtrip", dir.path());
    let file = m.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("outside the") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&file, &bytes[..6]).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(err.contains("too short for a safetensors header"), "{err}");
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &huge).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("header length") && err.contains("does not fit"),
        "{err}"
    );
    let mut garbled = bytes.clone();
    garbled[8] = b'[';
    std::fs::write(&file, &garbled).unwrap();
    let err = train_fails(dir.path(), &m);
    assert!(err.contains("malformed header"), "{err}");
}

#[test]
fn wrong_dtype_shape_and_names_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // A tensor stored as I32.
    let m = copy_fixture("roundtrip", dir.path());
    patch(&m.join("model.safetensors"), "\"F32\"", "\"I32\"");
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("is I32; model weights must be F32, F16 or BF16"),
        "{err}"
    );

    // config.json disagrees with the weights.
    let m = copy_fixture("roundtrip", dir.path());
    std::fs::remove_dir_all(&m).unwrap();
    let m = copy_fixture("roundtrip", dir.path());
    patch(
        &m.join("config.json"),
        "\"intermediate_size\": 64",
        "\"intermediate_size\": 96",
    );
    let err = train_fails(dir.path(), &m);
    assert!(
        err.contains("shape mismatch: model.layers.0.mlp.down_proj.weight: expected shape [96, 32], found [64, 32]"),
        "{err}"
    );

    // A renamed tensor: one missing, one unused.
    std::fs::remove_dir_all(&m).unwrap();
    let m = copy_fixture("roundtrip", dir.path());
    patch(
        &m.join("model.safetensors"),
        "model.norm.weight",
        "model.norx.weight",
    );
    let err = train_fails(dir.path(), &m);
    assert!(err.contains("missing: model.norm.weight"), "{err}");
    assert!(err.contains("unused: model.norx.weight"), "{err}");
}

#[test]
fn architecture_keys_beside_hf_dir_are_refused() {
    let err = {
        let r = run(&["inspect", FINETUNE, "--set", "model.qwen2.hidden_size=64"]);
        assert_eq!(r.status.code(), Some(1));
        stderr(&r)
    };
    assert!(
        err.contains("model.qwen2.hidden_size: comes from the `config.json` of `hf_dir`"),
        "{err}"
    );
}
