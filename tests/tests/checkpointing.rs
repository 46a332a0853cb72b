//! Activation checkpointing (`train.activation_checkpointing`): the same losses as the plain
//! backward pass, and exact resumes with adapter dropout (each layer replays its random
//! draws in the recomputation).

use kiln_tests::*;

#[test]
fn checkpointed_training_matches_the_plain_backward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert_ok(&run(&tiny_train_args(out, &["--set", "run.name=plain"])));
    assert_ok(&run(&tiny_train_args(
        out,
        &[
            "--set",
            "run.name=ckpt",
            "--set",
            "train.activation_checkpointing=true",
        ],
    )));
    let (plain, ckpt) = (
        losses(&dir.path().join("plain")),
        losses(&dir.path().join("ckpt")),
    );
    assert!(plain.len() > 5, "{plain:?}");
    assert_eq!(plain.len(), ckpt.len());
    for ((s, a), (_, b)) in plain.iter().zip(&ckpt) {
        // Gradients are summed layer by layer instead of in one pass: equal up to rounding.
        assert!((a - b).abs() < 1e-4 * a.abs(), "step {s}: {a} vs {b}");
    }
}

#[test]
fn checkpointed_adapter_runs_with_dropout_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = |name: &'static str, extra: &[&'static str]| {
        let mut a = vec![
            "train",
            "recipes/smoke/qwen2-qlora-tiny.toml",
            "--out",
            out,
            "--set",
            name,
            "--set",
            "train.activation_checkpointing=true",
            "--set",
            "model.qwen2.hidden_size=32",
            "--set",
            "model.qwen2.intermediate_size=64",
            "--set",
            "model.qwen2.num_hidden_layers=2",
            "--set",
            "phases[0].steps=8",
            "--set",
            "phases[0].window=32",
            "--set",
            "adapter.rank=4",
            "--set",
            "adapter.alpha=8",
            "--set",
            "adapter.dropout=0.1",
            "--set",
            "schedule.warmup_steps=2",
            "--set",
            "train.checkpoint_every=3",
            "--set",
            "train.eval_every=0",
        ];
        a.extend_from_slice(extra);
        a
    };
    assert_ok(&run(&args("run.name=straight", &[])));
    let first = run(&args("run.name=split", &["--stop-after", "4"]));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let split = dir.path().join("split");
    assert_ok(&run(&["resume", split.to_str().unwrap()]));
    let straight = losses(&dir.path().join("straight"));
    assert_eq!(straight.len(), 8);
    assert_eq!(straight, losses(&split), "resumed checkpointed run differs");
}

#[test]
fn head_chunks_keep_the_losses_gradients_and_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    // 128 tokens per micro-batch in chunks of 37: chunks cross sequence boundaries and the
    // last one is short.
    let runs: [(&str, &[&str]); 3] = [
        ("plain", &[]),
        ("chunked", &["--set", "train.head_chunk_tokens=37"]),
        (
            "chunked-ckpt",
            &[
                "--set",
                "train.head_chunk_tokens=37",
                "--set",
                "train.activation_checkpointing=true",
            ],
        ),
    ];
    for (name, extra) in runs {
        let set = format!("run.name={name}");
        let mut args = tiny_train_args(out, &["--set", &set]);
        args.extend_from_slice(extra);
        assert_ok(&run(&args));
    }
    let column = |name: &str, kind: &str, key: &str| -> Vec<f64> {
        metrics(&dir.path().join(name))
            .iter()
            .filter(|r| r["kind"] == kind)
            .map(|r| r[key].as_f64().unwrap())
            .collect()
    };
    for (kind, key) in [
        ("train", "loss"),
        ("train", "grad_norm"),
        ("eval", "eval_loss"),
    ] {
        let plain = column("plain", kind, key);
        assert!(!plain.is_empty(), "no {kind} {key} in the plain run");
        for name in ["chunked", "chunked-ckpt"] {
            let other = column(name, kind, key);
            assert_eq!(plain.len(), other.len(), "{name}: {kind} rows");
            for (i, (a, b)) in plain.iter().zip(&other).enumerate() {
                // The head's weight gradient is summed over chunks: equal up to rounding.
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs(),
                    "{name}, {kind} row {i}: {key} {a} in one piece, {b} in chunks"
                );
            }
        }
    }
    let zero = run(&["inspect", SMOKE, "--set", "train.head_chunk_tokens=0"]);
    assert_eq!(zero.status.code(), Some(1));
    assert!(
        stderr(&zero).contains("train.head_chunk_tokens: must be at least 1"),
        "{}",
        stderr(&zero)
    );
}
