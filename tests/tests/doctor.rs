//! `kiln doctor`: every kiln operation and its gradients on one backend against the CPU
//! reference, through the CLI.

use kiln_tests::*;

#[test]
fn doctor_checks_ndarray_against_flex_and_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("doctor.json");
    let out = run(&[
        "doctor",
        "--backend",
        "ndarray",
        "--tolerance",
        "1e-5",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("nf4 linear, down"),
        "{}",
        stdout(&out)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let checks: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["check"].as_str().unwrap()).collect();
    for check in [
        "nf4 weight expansion",
        "nf4 linear, up",
        "qlora projection",
        "attention",
        "cross-entropy",
        "chunk attention",
    ] {
        assert!(checks.contains(check), "{check} missing from {checks:?}");
    }
    for r in &rows {
        let error = r["error"].as_f64().unwrap();
        assert!(r["pass"].as_bool().unwrap() && error <= 1e-5, "{r}");
        // The CPU backends give the same values on every run.
        assert_eq!(r["spread"].as_f64(), Some(0.0), "{r}");
    }
    let lora_b = rows
        .iter()
        .find(|r| r["check"] == "qlora projection" && r["output"] == "d lora_B");
    assert!(lora_b.is_some(), "the adapter's gradient is compared");
}

#[test]
fn doctor_fails_naming_the_outputs_beyond_the_tolerance() {
    // Flex and NdArray round differently in reductions: no tolerance of 1e-12 holds.
    let out = run(&["doctor", "--tolerance", "1e-12", "--repeat", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("differ from the CPU reference beyond 1e-12") && err.contains("matmul (d x)"),
        "{err}"
    );
    assert!(stdout(&out).contains("FAIL"), "{}", stdout(&out));
    let bad = run(&["doctor", "--tolerance", "0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("--tolerance must be positive"));
}
