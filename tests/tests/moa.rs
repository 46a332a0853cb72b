//! The MoA family and DiscoverLM's method through the CLI: the smoke recipe trains with its
//! router statistics, auxiliary losses and dream reports; resume is exact with dream state;
//! activation checkpointing carries the auxiliary losses; the convergence guard stops a
//! stalled run; changing tokens per step is warned about.

use std::path::Path;

use kiln_tests::*;

const RECIPE: &str = "recipes/smoke/moa-tiny.toml";

fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect()
}

fn train(out: &str, name: &str, extra: &[&str]) -> std::process::Output {
    let name = format!("run.name={name}");
    let mut args = vec!["train", RECIPE, "--out", out, "--set", &name];
    args.extend_from_slice(extra);
    run(&args)
}

/// The shortened curriculum the resume and checkpointing tests use (20 steps).
const SHORT: [&str; 8] = [
    "--set",
    "phases[0].steps=12",
    "--set",
    "phases[1].steps=8",
    "--set",
    "dream.every=5",
    "--set",
    "train.eval_every=10",
];

#[test]
fn the_smoke_recipe_trains_with_router_usage_auxiliary_losses_and_dream_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let result = train(out, "smoke", &[]);
    assert_ok(&result);
    let run_dir = dir.path().join("smoke");
    let l = losses(&run_dir);
    assert_eq!(l.len(), 60);
    let first = l[0].1;
    let last: f64 = l[50..].iter().map(|(_, x)| x).sum::<f64>() / 10.0;
    assert!(
        last < 0.55 * first,
        "the loss must fall: first {first}, mean of the last ten {last}"
    );
    let evals = eval_losses(&run_dir);
    assert!(*evals.last().unwrap() < 2.7, "eval losses {evals:?}");

    for row in metrics(&run_dir).iter().filter(|r| r["kind"] == "train") {
        let aux = row["aux_losses"].as_object().expect("aux_losses");
        assert!(
            aux.contains_key("triangle") && aux.contains_key("balance"),
            "{row}"
        );
        let usage = row["router_usage"].as_object().expect("router_usage");
        // Two blocks, each with its mixer's and its HyperFFN's router.
        assert_eq!(usage.len(), 4, "{row}");
        for (name, v) in usage {
            let v: Vec<f64> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let paths = if name.contains(".moa.") { 4 } else { 3 };
            assert_eq!(
                v.len(),
                paths + 1,
                "{name}: usage per path, then confidence"
            );
            // Every token keeps exactly two paths.
            let kept: f64 = v[..paths].iter().sum();
            assert!((kept - 2.0).abs() < 1e-4, "{name}: {v:?}");
        }
    }

    let dream = rows(&run_dir.join("dream.jsonl"));
    assert_eq!(
        dream
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [10, 20, 30, 40, 50, 60]
    );
    for r in &dream {
        assert_eq!(r["routers"].as_object().unwrap().len(), 4, "{r}");
        let lo = r["multiplier_min"].as_f64().unwrap();
        let hi = r["multiplier_max"].as_f64().unwrap();
        assert!(
            (0.05..=1.0).contains(&lo) && (1.0..=4.0).contains(&hi),
            "{r}"
        );
    }
    // The cycles change learning rates: something was crystallized, dissolved or pruned.
    assert!(
        dream.iter().any(|r| ["crystallized", "dissolved", "pruned"]
            .iter()
            .any(|k| !r[k].as_array().unwrap().is_empty())),
        "no dream cycle acted"
    );
    let log = stderr(&result);
    assert!(log.contains("dream cycle 6 at step 60"), "{log}");

    // The trained model generates.
    let g = run(&[
        "generate",
        run_dir.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]);
    assert_ok(&g);
    assert!(!stdout(&g).trim().is_empty());
}

#[test]
fn resume_continues_exactly_with_the_dream_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert_ok(&train(out, "straight", &SHORT));
    let mut split_args = SHORT.to_vec();
    split_args.extend(["--stop-after", "7"]);
    let first = train(out, "split", &split_args);
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let split = dir.path().join("split");
    assert_ok(&run(&["resume", split.to_str().unwrap()]));
    let straight = dir.path().join("straight");
    assert_eq!(losses(&straight), losses(&split));
    let strip = |rows: Vec<serde_json::Value>| -> Vec<String> {
        rows.iter().map(|r| r.to_string()).collect()
    };
    assert_eq!(
        strip(rows(&straight.join("dream.jsonl"))),
        strip(rows(&split.join("dream.jsonl")))
    );
    let usage = |d: &Path| -> Vec<String> {
        metrics(d)
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| r["router_usage"].to_string())
            .collect()
    };
    assert_eq!(usage(&straight), usage(&split));
}

#[test]
fn activation_checkpointing_and_head_chunks_keep_the_losses_with_auxiliary_terms() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    // DropPath draws differ between the two passes' orders, so it is off here; the triangle
    // triples are drawn differently too, but its values are negligible next to the loss.
    let mut plain = SHORT.to_vec();
    plain.extend(["--set", "model.moa.drop_path=0.0"]);
    let mut checkpointed = plain.clone();
    checkpointed.extend(["--set", "train.activation_checkpointing=true"]);
    // The head is the tied embedding: its gradient comes from the chunks and the input.
    let mut chunked = plain.clone();
    chunked.extend(["--set", "train.head_chunk_tokens=300"]);
    assert_ok(&train(out, "plain", &plain));
    assert_ok(&train(out, "ckpt", &checkpointed));
    assert_ok(&train(out, "chunked", &chunked));
    let balance = |d: &Path| -> Vec<f64> {
        metrics(d)
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| r["aux_losses"]["balance"].as_f64().unwrap())
            .collect()
    };
    let a = losses(&dir.path().join("plain"));
    for name in ["ckpt", "chunked"] {
        let b = losses(&dir.path().join(name));
        assert_eq!(a.len(), b.len());
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-3 * x.abs(),
                "step {s}: {x} plain, {y} with {name}"
            );
        }
        for (x, y) in balance(&dir.path().join("plain"))
            .iter()
            .zip(balance(&dir.path().join(name)))
        {
            assert!((x - y).abs() <= 1e-3 * x.abs(), "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn the_convergence_guard_stops_a_stalled_run_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    // A learning rate too small to move the eval loss by 1% in 10 steps.
    let result = train(
        out,
        "stalled",
        &[
            "--set",
            "optim.lr=1e-7",
            "--set",
            "schedule.min_lr=0.0",
            "--set",
            "train.eval_every=5",
            "--set",
            "train.convergence_window=10",
        ],
    );
    assert_ok(&result);
    let log = stderr(&result);
    assert!(
        log.contains("converged: the best eval loss of steps 6..=15"),
        "{log}"
    );
    let run_dir = dir.path().join("stalled");
    assert_eq!(losses(&run_dir).len(), 15);
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"], "finished");
    assert!(status["message"].as_str().unwrap().contains("converged"));
    assert!(checkpoints(&run_dir).contains(&"step-00000015".to_string()));
}

#[test]
fn phases_with_different_tokens_per_step_are_warned_about_unless_intended() {
    let warned = run(&[
        "inspect",
        RECIPE,
        "--no-data",
        "--set",
        "phases[1].batch_size=4",
    ]);
    assert_ok(&warned);
    let log = stderr(&warned);
    assert!(
        log.contains("warning:")
            && log.contains("moa-tiny.toml: phases[1]: 512 tokens per step")
            && log.contains("phases[0]'s 1024"),
        "{log}"
    );
    let intended = run(&[
        "inspect",
        RECIPE,
        "--no-data",
        "--set",
        "phases[1].batch_size=4",
        "--set",
        "train.varying_tokens_per_step=true",
    ]);
    assert_ok(&intended);
    assert!(
        !stderr(&intended).contains("warning:"),
        "{}",
        stderr(&intended)
    );
    // The inspection shows the parameter budget and the active fraction.
    let text = stdout(&intended);
    assert!(
        text.contains("MoA: multi-head metric attention") && text.contains("active per token"),
        "{text}"
    );
}
