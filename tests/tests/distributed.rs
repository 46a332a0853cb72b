//! Data-parallel training (`[distributed]`) over loopback: `kiln orchestrator` and two
//! `kiln train` processes, each a node with one CPU device, against one process training on
//! the doubled batch; a resume of the two-process run; and a peer killed mid-run.

use std::path::Path;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use kiln_tests::*;

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}

/// `kiln orchestrator` on a fresh port: the process and the `host:port` to give the nodes.
fn orchestrator() -> (Child, String) {
    let port = free_port();
    let child = spawn(&["orchestrator", "--port", &port.to_string()], &[]);
    (child, format!("127.0.0.1:{port}"))
}

/// The environment of the process of `rank` (its own data port, as on separate hosts).
fn node_env(rank: u32, orchestrator: &str) -> Vec<(String, String)> {
    vec![
        ("KILN_RANK".to_string(), rank.to_string()),
        ("KILN_ORCHESTRATOR".to_string(), orchestrator.to_string()),
        ("KILN_DATA_PORT".to_string(), free_port().to_string()),
    ]
}

/// Starts `kiln ARGS` as the process of each rank, with `extra_env` for all of them.
fn start_nodes(args: &[&str], orchestrator: &str, extra_env: &[(&str, &str)]) -> Vec<Child> {
    (0..2)
        .map(|rank| {
            let env = node_env(rank, orchestrator);
            let mut all: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            all.extend_from_slice(extra_env);
            spawn(args, &all)
        })
        .collect()
}

/// Waits for every process and returns their outputs.
fn wait_all(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("kiln ran"))
        .collect()
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The two-node run: per-node batches half the tiny run's, one node per rank.
fn dp_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = tiny_train_args(
        out,
        &[
            "--set",
            "run.name=dp",
            "--set",
            "phases[0].batch_size=2",
            "--set",
            "phases[1].batch_size=1",
            "--set",
            "distributed.nodes=2",
            "--set",
            "distributed.timeout_s=20",
        ],
    );
    args.extend_from_slice(extra);
    args
}

/// The tiny run in one process (its batches are the two nodes' together).
fn single_losses(dir: &Path) -> Vec<(u64, f64)> {
    let out = dir.to_str().unwrap();
    assert_ok(&run(&tiny_train_args(out, &["--set", "run.name=single"])));
    losses(&dir.join("single"))
}

/// `kiln resume` on both ranks, through a fresh orchestrator, to the end of the run.
fn resume_both(run_dir: &Path) -> Vec<Output> {
    let (orch, addr) = orchestrator();
    let outs = wait_all(start_nodes(
        &["resume", run_dir.to_str().unwrap()],
        &addr,
        &[],
    ));
    stop(orch);
    for o in &outs {
        assert_ok(o);
    }
    outs
}

fn assert_close(single: &[(u64, f64)], dp: &[(u64, f64)]) {
    assert_eq!(single.len(), 12);
    assert_eq!(
        single.iter().map(|r| r.0).collect::<Vec<_>>(),
        dp.iter().map(|r| r.0).collect::<Vec<_>>(),
        "the same steps"
    );
    for ((step, a), (_, b)) in single.iter().zip(dp) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {step}: one process {a}, two {b}\n{single:?}\n{dp:?}"
        );
    }
}

#[test]
fn two_loopback_nodes_train_as_one_process_on_the_doubled_batch_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let single = single_losses(dir.path());
    let out = dir.path().to_str().unwrap();

    // Steps 1..=5, then a planned stop on both (exit status 75, the leader checkpoints).
    let (orch, addr) = orchestrator();
    let outs = wait_all(start_nodes(
        &dp_args(out, &["--stop-after", "5"]),
        &addr,
        &[],
    ));
    for o in &outs {
        assert_eq!(o.status.code(), Some(75), "{}", stderr(o));
    }
    assert!(
        stderr(&outs[0]).contains("all 2 processes joined at step 0"),
        "{}",
        stderr(&outs[0])
    );
    let run_dir = dir.path().join("dp");
    assert_eq!(losses(&run_dir).len(), 5);
    // Only the leader writes checkpoints; rank 1 logs beside the run.
    assert!(checkpoints(&run_dir).contains(&"step-00000005".to_string()));
    assert!(!dir.path().join("dp.rank-1").join("checkpoints").exists());
    assert_eq!(losses(&dir.path().join("dp.rank-1")), losses(&run_dir));
    stop(orch);

    for o in &resume_both(&run_dir) {
        assert!(stderr(o).contains("at step 5"), "{}", stderr(o));
    }
    assert_close(&single, &losses(&run_dir));
}

#[test]
fn a_dead_peer_stops_the_other_with_an_error_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let single = single_losses(dir.path());
    let out = dir.path().to_str().unwrap();
    let run_dir = dir.path().join("dp");

    // Slow checkpoints (every 2 steps) keep the run going long enough to kill rank 1 in it.
    let (orch, addr) = orchestrator();
    let mut nodes = start_nodes(
        &dp_args(out, &[]),
        &addr,
        &[("KILN_TEST_CHECKPOINT_PAUSE_MS", "150")],
    );
    assert!(
        wait_for(Duration::from_secs(120), || checkpoints(&run_dir)
            .contains(&"step-00000004".to_string())),
        "the run reached step 4"
    );
    let mut rank1 = nodes.pop().expect("rank 1");
    rank1.kill().expect("kill -9 rank 1");
    let _ = rank1.wait();
    let killed = Instant::now();
    let leader = nodes.pop().expect("rank 0").wait_with_output().unwrap();
    let waited = killed.elapsed();
    stop(orch);
    assert!(!leader.status.success(), "{}", stderr(&leader));
    let err = stderr(&leader);
    assert!(
        err.contains("distributed: rank 0 of 2") && err.contains("kiln resume"),
        "{err}"
    );
    // Within the 20 s timeout (plus a step), never a hang.
    assert!(waited < Duration::from_secs(40), "took {waited:?}: {err}");
    let done = losses(&run_dir).len();
    assert!((4..12).contains(&done), "{done} steps before the failure");

    resume_both(&run_dir);
    assert_close(&single, &losses(&run_dir));
}

#[test]
fn bad_distributed_settings_are_refused_with_the_key_or_variable_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let fails = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = kiln(&tiny_train_args(out, extra));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().expect("kiln runs");
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        stderr(&o)
    };
    let err = fails(
        &[
            "--set",
            "distributed.nodes=2",
            "--set",
            "distributed.rank=2",
        ],
        &[],
    );
    assert!(
        err.contains("distributed.rank") && err.contains("outside 0..2"),
        "{err}"
    );
    let err = fails(
        &[
            "--set",
            "distributed.nodes=2",
            "--set",
            "distributed.strategy=\"star\"",
        ],
        &[],
    );
    assert!(err.contains("distributed.strategy"), "{err}");
    let err = fails(&["--set", "distributed.nodes=2"], &[("KILN_RANK", "two")]);
    assert!(err.contains("KILN_RANK=`two`"), "{err}");
    let err = fails(&["--set", "distributed.nodes=2"], &[("KILN_RANK", "3")]);
    assert!(err.contains("rank 3 is outside 0..2"), "{err}");
}

#[test]
fn dream_consolidation_sees_every_process_and_stays_identical_on_both() {
    // MoA with dream cycles: each cycle reads the router statistics and gradients of the
    // whole global batch, so both ranks reach the same multipliers and the same steps.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = [
        "train",
        "recipes/smoke/moa-tiny.toml",
        "--out",
        out,
        "--set",
        "phases[0].steps=4",
        "--set",
        "phases[0].batch_size=4",
        "--set",
        "phases[1].steps=2",
        "--set",
        "phases[1].batch_size=2",
        "--set",
        "dream.every=2",
        "--set",
        "train.eval_every=0",
        "--set",
        "distributed.nodes=2",
    ];
    let (orch, addr) = orchestrator();
    let outs = wait_all(start_nodes(&args, &addr, &[]));
    stop(orch);
    for o in &outs {
        assert_ok(o);
    }
    let leader = dir.path().join("moa-tiny");
    let peer = dir.path().join("moa-tiny.rank-1");
    let dream = |d: &Path| std::fs::read_to_string(d.join("dream.jsonl")).expect("dream.jsonl");
    assert_eq!(dream(&leader).lines().count(), 3, "three dream cycles");
    assert_eq!(dream(&leader), dream(&peer));
    assert_eq!(losses(&leader), losses(&peer));
}
