//! `kiln runs`: a table of the runs under a directory.
//!
//! A run is any directory holding a resolved recipe (`recipe.resolved.toml`), found at most
//! two levels down, so that both `runs/` and a folder of `out_dir`s can be listed. The
//! table comes from the files a run keeps: the recipe (family, backend), `status.json`,
//! `metrics.jsonl` and `checkpoints/`. A run whose status says `running` but whose process
//! is gone is shown as `crashed`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::Serialize;

use kiln_train::{RunDir, RunStatus};

/// One row of the table.
#[derive(Debug, Serialize)]
pub struct RunRow {
    /// The run directory.
    pub path: String,
    /// The run directory's name (`run.name` unless the directory was moved).
    pub name: String,
    /// `model.family`.
    pub family: String,
    /// `run.backend`.
    pub backend: String,
    /// `running`, `finished`, `interrupted`, `failed`, `crashed` or `new`.
    pub status: String,
    /// The last step done.
    pub steps: u64,
    /// The last training loss.
    pub last_loss: Option<f64>,
    /// The lowest evaluation loss.
    pub best_eval: Option<f64>,
    /// Tokens trained on.
    pub tokens: Option<u64>,
    /// Seconds of training (summed over resumptions as the metrics record them).
    pub wall_s: Option<f64>,
    /// The newest checkpoint's directory name.
    pub checkpoint: Option<String>,
    /// Why the run stopped, when its status says.
    pub message: Option<String>,
}

/// Run directories under `dir` (itself, its children and grandchildren), sorted.
fn find_runs(dir: &Path) -> Vec<PathBuf> {
    let is_run = |p: &Path| p.join(kiln_train::run::RESOLVED_RECIPE).is_file();
    if is_run(dir) {
        return vec![dir.to_path_buf()];
    }
    let children = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let mut found = Vec::new();
    for child in children(dir) {
        if is_run(&child) {
            found.push(child);
        } else {
            found.extend(children(&child).into_iter().filter(|g| is_run(g)));
        }
    }
    found
}

/// Whether a process with this pid exists (Linux: `/proc/<pid>`). Elsewhere, unknown:
/// treated as alive, so a run is never called crashed on a guess.
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// A key of the resolved recipe, as text.
fn recipe_key(recipe: &toml::Value, section: &str, key: &str) -> String {
    recipe
        .get(section)
        .and_then(|s| s.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_string()
}

/// Reads one run's row.
pub fn row(path: &Path) -> Result<RunRow> {
    let run = RunDir::open(path)?;
    let text = std::fs::read_to_string(path.join(kiln_train::run::RESOLVED_RECIPE))?;
    let recipe: toml::Value =
        toml::from_str(&text).unwrap_or(toml::Value::Table(Default::default()));
    let rows = kiln_train::read_metrics(&path.join("metrics.jsonl"))?;
    let kind = |r: &&serde_json::Value, k: &str| r.get("kind").and_then(|v| v.as_str()) == Some(k);
    let last_train = rows.iter().rev().find(|r| kind(r, "train"));
    let best_eval = rows
        .iter()
        .filter(|r| kind(r, "eval"))
        .filter_map(|r| r.get("eval_loss").and_then(|v| v.as_f64()))
        .reduce(f64::min);
    let status = run.read_status();
    let (label, steps, message) = match &status {
        None => ("new".to_string(), 0, None),
        Some(s) => {
            let label = match s.status {
                RunStatus::Running if !alive(s.pid) => "crashed",
                RunStatus::Running => "running",
                RunStatus::Finished => "finished",
                RunStatus::Interrupted => "interrupted",
                RunStatus::Failed => "failed",
            };
            (label.to_string(), s.step, s.message.clone())
        }
    };
    let field = |k: &str| last_train.and_then(|r| r.get(k));
    Ok(RunRow {
        path: path.display().to_string(),
        name: path.file_name().map_or_else(
            || recipe_key(&recipe, "run", "name"),
            |n| n.to_string_lossy().into_owned(),
        ),
        family: recipe_key(&recipe, "model", "family"),
        backend: recipe_key(&recipe, "run", "backend"),
        status: label,
        steps: steps.max(field("step").and_then(|v| v.as_u64()).unwrap_or(0)),
        last_loss: field("loss").and_then(|v| v.as_f64()),
        best_eval,
        tokens: field("trained_tokens").and_then(|v| v.as_u64()),
        wall_s: field("elapsed_s").and_then(|v| v.as_f64()),
        checkpoint: kiln_train::checkpoint::list_checkpoints(path)
            .first()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
        message,
    })
}

fn human_duration(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Prints the table (or JSON) of the runs under `dir`.
pub fn runs(dir: &Path, json: bool) -> Result<()> {
    if !dir.is_dir() {
        bail!("`{}` is not a directory", dir.display());
    }
    let rows: Vec<RunRow> = find_runs(dir)
        .iter()
        .map(|p| row(p))
        .collect::<Result<_>>()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("no runs under `{}`", dir.display());
        return Ok(());
    }
    let header = [
        "RUN",
        "FAMILY",
        "BACKEND",
        "STATUS",
        "STEPS",
        "LOSS",
        "BEST EVAL",
        "TOKENS",
        "WALL",
        "CHECKPOINT",
    ];
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let table: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.family.clone(),
                r.backend.clone(),
                r.status.clone(),
                r.steps.to_string(),
                opt(r.last_loss.map(|l| format!("{l:.4}"))),
                opt(r.best_eval.map(|l| format!("{l:.4}"))),
                opt(r.tokens.map(crate::inspect::human_count)),
                opt(r.wall_s.map(human_duration)),
                opt(r.checkpoint.clone()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                // Numbers right-aligned, words left-aligned.
                if (4..=8).contains(&c) {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for (row, r) in table.iter().zip(&rows) {
        line(row.iter().map(String::as_str).collect());
        if let Some(m) = &r.message
            && r.status != "finished"
        {
            println!("  └ {m}");
        }
    }
    Ok(())
}
