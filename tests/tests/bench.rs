//! `kiln bench`: real optimizer steps of a recipe, timed, with a JSON result that
//! `scripts/bench_torch.py --like` reads.

use kiln_tests::*;

#[test]
fn bench_times_optimizer_steps_and_writes_a_json_result() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let out = run(&[
        "bench",
        "recipes/smoke/moa-tiny.toml",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--phase",
        "1",
        "--peak-gflops",
        "100",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let printed: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON on stdout");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(printed, written);
    let r = &printed;
    assert_eq!(r["framework"], "kiln");
    assert_eq!(r["family"], "moa");
    // Phase 1 of the smoke recipe: batch 8 x window 128.
    assert_eq!(
        (r["batch"].as_u64(), r["seq"].as_u64()),
        (Some(8), Some(128))
    );
    assert_eq!(r["step_times_s"].as_array().unwrap().len(), 3);
    let tps = r["tokens_per_s"].as_f64().unwrap();
    let step = r["step_time_s"].as_f64().unwrap();
    assert!(
        tps > 0.0 && (tps * step - 1024.0).abs() < 1e-6 * 1024.0,
        "{r}"
    );
    let gflops = r["gflops"].as_f64().unwrap();
    assert!(
        (r["mfu"].as_f64().unwrap() - gflops / 100.0).abs() < 1e-9,
        "{r}"
    );
    assert_eq!(r["peak"]["basis"], "given (--peak-gflops)");
    assert!(r["params"].as_u64().unwrap() > 0);
    assert!(r["model"]["hidden_size"].as_u64() == Some(64));
    // What a PyTorch counterpart copies besides the model: no adapter, the train settings.
    assert!(r["adapter"].is_null(), "{r}");
    assert_eq!(r["train"]["activation_checkpointing"], false);
    assert!(r["train"]["neftune_alpha"].is_number(), "{r}");
    // CPU backends report host memory only.
    assert!(r["peak_device_bytes"].is_null() && r["peak_rss_bytes"].as_u64() > Some(0));
    let log = stderr(&out);
    assert!(log.contains("tokens/s") && log.contains("MFU"), "{log}");
    // Nothing is left in the recipe's run directory.
    assert!(!repo_root().join("runs/bench").exists());

    let bad = run(&["bench", "recipes/smoke/moa-tiny.toml", "--phase", "7"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("--phase 7: the recipe has 2 phases"),
        "{}",
        stderr(&bad)
    );
}
