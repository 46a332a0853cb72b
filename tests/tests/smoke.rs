//! The smoke recipe trains end to end through the `kiln` binary and its loss falls.

use kiln_tests::*;

/// The full smoke recipe, as the README runs it: the loss must fall clearly and the final
/// held-out loss must beat the uniform distribution over the 260 byte-tokenizer ids.
#[test]
fn smoke_recipe_trains_and_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let result = run(&["train", SMOKE, "--out", out]);
    assert_ok(&result);
    let run_dir = dir.path().join("qwen2-tiny");
    let losses = losses(&run_dir);
    assert_eq!(losses.len(), 80, "one metrics row per optimizer step");
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|(_, l)| l).sum::<f64>() / xs.len() as f64;
    let first = mean(&losses[..10]);
    let last = mean(&losses[losses.len() - 10..]);
    assert!(
        last < first - 1.0,
        "loss should fall clearly: first-10 mean {first:.3}, last-10 mean {last:.3}"
    );
    let uniform = (260f64).ln();
    let evals = eval_losses(&run_dir);
    let final_eval = *evals.last().expect("an eval row at the end");
    assert!(
        final_eval < uniform - 1.0,
        "eval loss {final_eval:.3} vs uniform {uniform:.3}"
    );
    // Every metrics row carries the documented fields.
    for row in metrics(&run_dir).iter().filter(|r| r["kind"] == "train") {
        for key in ["step", "phase", "loss", "lr", "tokens", "tokens_per_s"] {
            assert!(row.get(key).is_some(), "train row lacks `{key}`: {row}");
        }
    }
    for row in metrics(&run_dir).iter().filter(|r| r["kind"] == "eval") {
        for key in ["eval_loss", "perplexity", "bits_per_byte"] {
            assert!(row.get(key).is_some(), "eval row lacks `{key}`: {row}");
        }
    }
    assert!(run_dir.join("recipe.resolved.toml").is_file());
    assert_eq!(
        checkpoints(&run_dir).last().map(String::as_str),
        Some("step-00000080")
    );
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"], "finished");
    let err = stderr(&result);
    assert!(
        err.contains("tokens trained"),
        "per-source token counts are logged:\n{err}"
    );

    // `kiln eval` on the final checkpoint reproduces the final eval row.
    let eval = run(&["eval", run_dir.to_str().unwrap()]);
    assert_ok(&eval);
    let json: serde_json::Value = serde_json::from_str(&stdout(&eval)).expect("eval prints JSON");
    let eval_loss = json["eval_loss"].as_f64().unwrap();
    assert!(
        (eval_loss - final_eval).abs() < 1e-9,
        "{eval_loss} vs {final_eval}"
    );
    assert_eq!(json["step"], 80);
}

/// ndarray and flex run the same model from the same host-side initialization, so their
/// first losses agree to float tolerance.
#[test]
fn ndarray_and_flex_agree() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let mut results = Vec::new();
    for backend in ["flex", "ndarray"] {
        let name = format!("run.name={backend}");
        let be = format!("run.backend={backend}");
        let args = tiny_train_args(out, &["--set", &name, "--set", &be]);
        assert_ok(&run(&args));
        results.push(losses(&dir.path().join(backend)));
    }
    for ((s, a), (_, b)) in results[0].iter().zip(&results[1]).take(4) {
        assert!((a - b).abs() < 1e-3, "step {s}: flex {a} vs ndarray {b}");
    }
}

#[test]
fn inspect_reports_parameters_tokens_and_data() {
    let out = run(&["inspect", SMOKE]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("772.7K parameters"), "{text}");
    assert!(text.contains("1024 tokens/step"), "{text}");
    assert!(text.contains("tales") && text.contains("notes"), "{text}");
    assert!(text.contains("memory"), "{text}");
    assert!(text.contains("# resolved recipe"), "{text}");
}

#[test]
fn help_documents_every_command_and_flag() {
    let out = run(&["--help"]);
    assert_ok(&out);
    let text = stdout(&out);
    for cmd in ["train", "resume", "eval", "inspect"] {
        assert!(text.contains(cmd), "--help lacks `{cmd}`:\n{text}");
    }
    let train = stdout(&run(&["train", "--help"]));
    for flag in ["--set", "--out", "--overwrite", "--stop-after"] {
        assert!(
            train.contains(flag),
            "train --help lacks `{flag}`:\n{train}"
        );
    }
    let resume = stdout(&run(&["resume", "--help"]));
    assert!(resume.contains("--allow-recipe-change"), "{resume}");
}
