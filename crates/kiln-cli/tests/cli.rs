//! The binary starts and documents itself. (This integration test also makes
//! `cargo test --workspace` build the `kiln` binary that the end-to-end tests in `tests/`
//! drive.)

use std::process::Command;

#[test]
fn version_and_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("kiln "));
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("help")
        .arg("train")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("--set"));
}
