//! Every shipped recipe opens with a comment that says how to run it, and validates.

use std::path::{Path, PathBuf};

use kiln_tests::*;

fn recipes(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            recipes(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_recipe_is_documented_and_valid() {
    let mut found = Vec::new();
    recipes(&repo_root().join("recipes"), &mut found);
    assert!(!found.is_empty());
    for path in found {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with('#'),
            "{} must open with a comment",
            path.display()
        );
        // Editors find the schema through the first line.
        let first = text.lines().next().unwrap();
        let schema = first.strip_prefix("#:schema ").unwrap_or_else(|| {
            panic!("{}: the first line must be `#:schema PATH`", path.display())
        });
        assert!(
            path.parent().unwrap().join(schema).is_file(),
            "{}: `#:schema {schema}` does not lead to the schema",
            path.display()
        );
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            header.contains("kiln train"),
            "{}: the opening comment gives the command",
            path.display()
        );
        let rel = path
            .strip_prefix(repo_root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // Recipes whose model the user supplies (`hf_dir = "models/..."`) are checked against
        // a shipped model directory instead, without reading their (user-supplied) data.
        let out = if text.contains("hf_dir = \"models/") {
            run(&[
                "inspect",
                &rel,
                "--no-data",
                "--set",
                "model.qwen2.hf_dir=\"tests/fixtures/qwen2/roundtrip\"",
            ])
        } else if needs_user_files(&text) {
            // Data or a tokenizer the user supplies (e.g. `data/SYNTH/*.parquet`): check
            // everything but reading them.
            run(&["inspect", &rel, "--no-data"])
        } else {
            run(&["inspect", &rel])
        };
        assert_ok(&out);
    }
}

/// Whether a recipe names a source or tokenizer file this repository does not ship (for a
/// glob, whether its directory is missing).
fn needs_user_files(text: &str) -> bool {
    let recipe: toml::Table = text.parse().expect("recipe parses");
    let mut paths: Vec<String> = Vec::new();
    if let Some(p) = recipe
        .get("tokenizer")
        .and_then(|t| t.get("path"))
        .and_then(|p| p.as_str())
    {
        paths.push(p.to_string());
    }
    if let Some(sources) = recipe
        .get("data")
        .and_then(|d| d.get("sources"))
        .and_then(|s| s.as_array())
    {
        for s in sources {
            if let Some(p) = s.get("path").and_then(|p| p.as_str()) {
                paths.push(p.to_string());
            }
        }
    }
    paths.iter().any(|p| {
        let path = Path::new(p);
        let path = if p.contains(['*', '?', '[']) {
            path.parent().unwrap_or(path)
        } else {
            path
        };
        !repo_root().join(path).exists()
    })
}
