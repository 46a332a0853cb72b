//! Helpers for the end-to-end tests in `tests/tests/`, which drive the real `kiln` binary.
//!
//! The binary is the one cargo builds beside the test executables (`target/<profile>/kiln`;
//! `cargo test --workspace` builds it because `kiln-cli` has an integration test of its
//! own). Set `KILN_BIN` to test another build.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root (tests run with relative data paths from there).
pub fn repo_root() -> PathBuf {
    manifest_dir()
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of the `kiln` binary under test.
pub fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kiln
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "`{}` not found: build it with `cargo build -p kiln-cli` or set KILN_BIN",
        bin.display()
    );
    bin
}

/// A `kiln` command run from the repository root, without color.
pub fn kiln(args: &[&str]) -> Command {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args)
        .current_dir(repo_root())
        .env("NO_COLOR", "1")
        .env_remove("KILN_TEST_CHECKPOINT_PAUSE_MS")
        .stdin(Stdio::null());
    cmd
}

/// Runs `kiln` to completion.
pub fn run(args: &[&str]) -> Output {
    kiln(args).output().expect("kiln runs")
}

/// Starts `kiln` in the background with captured output.
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = kiln(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts")
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the command succeeded, showing its output if not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "kiln failed with {:?}\n--- stderr\n{}\n--- stdout\n{}",
        out.status.code(),
        stderr(out),
        stdout(out)
    );
}

/// Rows of a run's `metrics.jsonl`.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl exists");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("metrics rows are JSON"))
        .collect()
}

/// `(step, loss)` of every training row.
pub fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    metrics(run_dir)
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| {
            (
                r["step"].as_u64().expect("step"),
                r["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

/// `eval_loss` of every evaluation row.
pub fn eval_losses(run_dir: &Path) -> Vec<f64> {
    metrics(run_dir)
        .iter()
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["eval_loss"].as_f64().expect("eval_loss"))
        .collect()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Names of the `step-*` checkpoint directories of a run, sorted.
pub fn checkpoints(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} failed");
}

/// Overrides that shrink the smoke recipe to a model and run that take about a second:
/// two phases of 6 steps, a checkpoint every 2 steps.
pub const TINY: &[&str] = &[
    "--set",
    "model.qwen2.hidden_size=32",
    "--set",
    "model.qwen2.intermediate_size=64",
    "--set",
    "model.qwen2.num_hidden_layers=2",
    "--set",
    "phases[0].steps=6",
    "--set",
    "phases[0].batch_size=4",
    "--set",
    "phases[0].window=32",
    "--set",
    "phases[1].steps=6",
    "--set",
    "phases[1].batch_size=2",
    "--set",
    "phases[1].window=64",
    "--set",
    "schedule.warmup_steps=2",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.keep_checkpoints=3",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.eval_tokens=512",
];

/// The smoke recipe, relative to the repository root.
pub const SMOKE: &str = "recipes/smoke/qwen2-tiny.toml";

/// `kiln train` arguments for the tiny smoke run into `out`, plus `extra`.
pub fn tiny_train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", SMOKE, "--out", out];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

/// The package directory: cargo's run-time `CARGO_MANIFEST_DIR` (right even when the
/// build directory is shared by checkouts at other paths), else the compile-time one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
