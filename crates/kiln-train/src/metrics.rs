//! `metrics.jsonl`: one JSON object per optimizer step (`"kind": "train"`) and per
//! evaluation (`"kind": "eval"`), appended and flushed as they happen.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::TrainError;

/// Appends rows to a run's `metrics.jsonl`.
#[derive(Debug)]
pub(crate) struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for a session starting after step `keep_through`. Rows of later
    /// steps, written after the last checkpoint by a session that crashed, are dropped
    /// first, so the log reads as if the run had never stopped.
    pub(crate) fn open(run_dir: &Path, keep_through: u64) -> Result<Self, TrainError> {
        Self::open_named(run_dir, "metrics.jsonl", keep_through)
    }

    /// [`MetricsLog::open`] for another JSON-lines log of the run (e.g. `dream.jsonl`).
    pub(crate) fn open_named(
        run_dir: &Path,
        name: &str,
        keep_through: u64,
    ) -> Result<Self, TrainError> {
        let path = run_dir.join(name);
        let io = |source| TrainError::Io {
            path: path.clone(),
            source,
        };
        if path.exists() {
            let step = keep_through;
            let rows = read_metrics(&path)?;
            let mut text = String::new();
            for row in rows {
                if row
                    .get("step")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
                    <= step
                {
                    text.push_str(&row.to_string());
                    text.push('\n');
                }
            }
            let tmp = run_dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, text).map_err(io)?;
            fs::rename(&tmp, &path).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Self { path, file })
    }

    /// Appends one row with a `kind` field.
    pub(crate) fn write(&mut self, kind: &str, row: &impl Serialize) -> Result<(), TrainError> {
        let mut value = serde_json::to_value(row).expect("metrics rows serialize");
        if let serde_json::Value::Object(map) = &mut value {
            map.insert(
                "kind".to_string(),
                serde_json::Value::String(kind.to_string()),
            );
        }
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| TrainError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads every complete row of a `metrics.jsonl` (a torn last line is ignored).
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>, TrainError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TrainError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut rows = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            rows.push(v);
        }
    }
    Ok(rows)
}
