//! ConvGPT-v2 through the CLI: the smoke recipe trains on the shipped Parquet rows with a
//! falling loss, resumes exactly, generates, and `kiln inspect` shows its per-token cost.

use kiln_tests::*;

const RECIPE: &str = "recipes/smoke/convgpt-tiny.toml";

#[test]
fn the_smoke_recipe_trains_on_shipped_parquet_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let result = run(&["train", RECIPE, "--out", out]);
    assert_ok(&result);
    let run_dir = dir.path().join("convgpt-tiny");
    let l = losses(&run_dir);
    assert_eq!(l.len(), 60);
    let first = l[0].1;
    let last: f64 = l[50..].iter().map(|(_, x)| x).sum::<f64>() / 10.0;
    assert!(
        last < 0.6 * first,
        "the loss must fall: first {first}, mean of the last ten {last}"
    );
    let evals = eval_losses(&run_dir);
    assert!(
        evals.len() == 2 && evals[1] < evals[0] && evals[1] < 3.2,
        "eval losses {evals:?}"
    );
    let g = run(&[
        "generate",
        run_dir.to_str().unwrap(),
        "--prompt",
        "What number comes next: 2, 5, 8",
        "--max-new-tokens",
        "12",
    ]);
    assert_ok(&g);
    assert!(!stdout(&g).trim().is_empty());
}

#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let short = ["--set", "phases[0].steps=6", "--set", "phases[1].steps=6"];
    let mut straight = vec!["train", RECIPE, "--out", out, "--set", "run.name=straight"];
    straight.extend(short);
    assert_ok(&run(&straight));
    let mut split = vec!["train", RECIPE, "--out", out, "--set", "run.name=split"];
    split.extend(short);
    split.extend(["--stop-after", "8"]);
    let first = run(&split);
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let split_dir = dir.path().join("split");
    assert_ok(&run(&["resume", split_dir.to_str().unwrap()]));
    assert_eq!(losses(&dir.path().join("straight")), losses(&split_dir));
}

#[test]
fn inspect_shows_the_grid_and_the_memory_reads() {
    let out = run(&["inspect", RECIPE]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("causal 3x3 conv over a 16x16 Hilbert grid (256 positions)")
            && text.contains("2 memory layers each reading 48 keys"),
        "{text}"
    );
    // A window longer than the grid is refused with the key that sets it.
    let long = run(&[
        "inspect",
        RECIPE,
        "--no-data",
        "--set",
        "phases[1].window=512",
    ]);
    assert_eq!(long.status.code(), Some(1));
    assert!(
        stderr(&long).contains("phases[1].window: 512 exceeds model max_position 256"),
        "{}",
        stderr(&long)
    );
}
