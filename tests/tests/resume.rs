//! Checkpoints and resume: exact continuation after a planned stop, a signal, `kill -9`
//! (also in the middle of a checkpoint write) and a corrupted checkpoint.

use std::path::Path;
use std::time::Duration;

use kiln_tests::*;

/// Trains the tiny run straight through in `dir` under the name `straight`.
fn straight_losses(dir: &Path) -> Vec<(u64, f64)> {
    let out = dir.to_str().unwrap();
    assert_ok(&run(&tiny_train_args(out, &["--set", "run.name=straight"])));
    let l = losses(&dir.join("straight"));
    assert_eq!(l.len(), 12);
    l
}

fn assert_same_losses(straight: &[(u64, f64)], resumed: &[(u64, f64)]) {
    assert_eq!(
        straight, resumed,
        "a resumed run must reproduce the uninterrupted run's losses exactly"
    );
}

#[test]
fn stop_and_resume_reproduces_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = straight_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    // Stop in the middle of the first phase (after step 5: the last checkpoint is step 4,
    // the stop writes step 5), then resume across the phase boundary to the end.
    let first = run(&tiny_train_args(
        out,
        &["--set", "run.name=split", "--stop-after", "5"],
    ));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    assert!(stderr(&first).contains("kiln resume"), "{}", stderr(&first));
    let run_dir = dir.path().join("split");
    assert_eq!(losses(&run_dir).len(), 5);
    let resumed = run(&["resume", run_dir.to_str().unwrap()]);
    assert_ok(&resumed);
    assert!(
        stderr(&resumed).contains("at step 5"),
        "{}",
        stderr(&resumed)
    );
    assert_same_losses(&straight, &losses(&run_dir));
    // Only the newest `keep_checkpoints` remain.
    assert_eq!(
        checkpoints(&run_dir),
        ["step-00000008", "step-00000010", "step-00000012"]
    );
}

#[test]
fn sigint_checkpoints_and_exits_resumably() {
    let dir = tempfile::tempdir().unwrap();
    let straight = straight_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    // Slow checkpoints down so that the run is still going when the signal arrives.
    let child = spawn(
        &tiny_train_args(out, &["--set", "run.name=sig"]),
        &[("KILN_TEST_CHECKPOINT_PAUSE_MS", "150")],
    );
    let run_dir = dir.path().join("sig");
    assert!(
        wait_for(Duration::from_secs(60), || run_dir
            .join("metrics.jsonl")
            .exists()
            && losses(&run_dir).len() >= 3),
        "training did not start"
    );
    signal(&child, "INT");
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("kiln resume"),
        "{err}"
    );
    let done = losses(&run_dir).len();
    assert!(done < 12, "the signal stopped the run early ({done} steps)");
    assert!(
        checkpoints(&run_dir).contains(&format!("step-{done:08}")),
        "a checkpoint of the last finished step ({done}) was written: {:?}",
        checkpoints(&run_dir)
    );
    let status = std::fs::read_to_string(run_dir.join("status.json")).unwrap();
    assert!(status.contains("interrupted"), "{status}");
    assert_ok(&run(&["resume", run_dir.to_str().unwrap()]));
    assert_same_losses(&straight, &losses(&run_dir));
}

#[test]
fn kill_9_during_a_checkpoint_write_leaves_a_resumable_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = straight_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    let mut child = spawn(
        &tiny_train_args(out, &["--set", "run.name=killed"]),
        &[("KILN_TEST_CHECKPOINT_PAUSE_MS", "400")],
    );
    let run_dir = dir.path().join("killed");
    let ckpt_root = run_dir.join("checkpoints");
    // Wait until the second checkpoint (step 4) is being written, then kill without mercy.
    let writing = wait_for(Duration::from_secs(60), || {
        checkpoints(&run_dir).len() == 1
            && std::fs::read_dir(&ckpt_root)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                })
                .unwrap_or(false)
    });
    assert!(writing, "never saw a checkpoint being written");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        checkpoints(&run_dir),
        ["step-00000002"],
        "the torn write is not a checkpoint"
    );
    let resumed = run(&["resume", run_dir.to_str().unwrap()]);
    assert_ok(&resumed);
    let err = stderr(&resumed);
    assert!(
        err.contains("removed an unfinished checkpoint write"),
        "{err}"
    );
    assert!(err.contains("at step 2"), "{err}");
    assert_same_losses(&straight, &losses(&run_dir));
}

#[test]
fn kill_9_before_any_checkpoint_restarts_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let straight = straight_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    let mut child = spawn(
        &tiny_train_args(
            out,
            &[
                "--set",
                "run.name=early",
                "--set",
                "train.checkpoint_every=100",
            ],
        ),
        &[],
    );
    let run_dir = dir.path().join("early");
    assert!(wait_for(Duration::from_secs(60), || run_dir
        .join("metrics.jsonl")
        .exists()
        && !losses(&run_dir).is_empty()));
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = run(&[
        "resume",
        run_dir.to_str().unwrap(),
        "--set",
        "train.checkpoint_every=2",
        "--allow-recipe-change",
    ]);
    assert_ok(&resumed);
    assert!(
        stderr(&resumed).contains("starting the run from step 0"),
        "{}",
        stderr(&resumed)
    );
    assert_same_losses(&straight, &losses(&run_dir));
}

#[test]
fn corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let straight = straight_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    let first = run(&tiny_train_args(
        out,
        &["--set", "run.name=corrupt", "--stop-after", "6"],
    ));
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let run_dir = dir.path().join("corrupt");
    assert_eq!(
        checkpoints(&run_dir),
        ["step-00000002", "step-00000004", "step-00000006"]
    );
    let model = run_dir.join("checkpoints/step-00000006/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    let resumed = run(&["resume", run_dir.to_str().unwrap()]);
    assert_ok(&resumed);
    let err = stderr(&resumed);
    assert!(
        err.contains("skipping checkpoint")
            && err.contains("step-00000006")
            && err.contains("corrupted"),
        "{err}"
    );
    assert!(err.contains("at step 4"), "{err}");
    assert_same_losses(&straight, &losses(&run_dir));
}

#[test]
fn resume_with_a_changed_recipe_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let first = run(&tiny_train_args(
        out,
        &["--set", "run.name=changed", "--stop-after", "3"],
    ));
    assert_eq!(first.status.code(), Some(75));
    let run_dir = dir.path().join("changed");
    let refused = run(&[
        "resume",
        run_dir.to_str().unwrap(),
        "--set",
        "optim.lr=0.01",
        "--set",
        "phases[1].window=48",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = stderr(&refused);
    assert!(err.contains("optim.lr: 0.003 -> 0.01"), "{err}");
    assert!(err.contains("phases[1].window: 64 -> 48"), "{err}");
    assert!(err.contains("--allow-recipe-change"), "{err}");
    let allowed = run(&[
        "resume",
        run_dir.to_str().unwrap(),
        "--set",
        "optim.lr=0.01",
        "--allow-recipe-change",
    ]);
    assert_ok(&allowed);
    assert_eq!(losses(&run_dir).len(), 12);
}

#[test]
fn a_diverging_run_stops_with_the_step_and_writes_no_checkpoint_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let result = run(&tiny_train_args(
        out,
        &[
            "--set",
            "run.name=diverge",
            "--set",
            "optim.lr=1e38",
            "--set",
            "schedule.warmup_steps=0",
        ],
    ));
    assert_eq!(result.status.code(), Some(1));
    let err = stderr(&result);
    assert!(err.contains("at step") && err.contains("diverged"), "{err}");
    let run_dir = dir.path().join("diverge");
    let steps_done = losses(&run_dir).len() as u64;
    for c in checkpoints(&run_dir) {
        let step: u64 = c.trim_start_matches("step-").parse().unwrap();
        assert!(
            step <= steps_done,
            "checkpoint {c} after the last finite step {steps_done}"
        );
    }
    let status = std::fs::read_to_string(run_dir.join("status.json")).unwrap();
    assert!(status.contains("failed"), "{status}");
}

#[test]
fn train_refuses_to_overwrite_an_existing_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    assert_eq!(
        run(&tiny_train_args(
            out,
            &["--set", "run.name=twice", "--stop-after", "1"]
        ))
        .status
        .code(),
        Some(75)
    );
    let again = run(&tiny_train_args(out, &["--set", "run.name=twice"]));
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("kiln resume"), "{}", stderr(&again));
    assert_ok(&run(&tiny_train_args(
        out,
        &["--set", "run.name=twice", "--overwrite"],
    )));
}
