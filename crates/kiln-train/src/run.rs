//! The run directory: `<out_dir>/<name>/` with the resolved recipe, metrics, status and
//! checkpoints.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kiln_recipe::{LoadedRecipe, Recipe};

use crate::TrainError;

/// Where a run stands, as recorded in `status.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// A process is training it (or died without saying so: check the pid).
    Running,
    /// All phases completed.
    Finished,
    /// Stopped by a signal or the wall-time limit, with a checkpoint to resume from.
    Interrupted,
    /// Stopped by an error.
    Failed,
}

/// What `status.json` says about a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusFile {
    /// Where the run stands.
    pub status: RunStatus,
    /// The last optimizer step done.
    pub step: u64,
    /// The process that wrote it.
    pub pid: u32,
    /// When, in seconds since the Unix epoch.
    pub updated_unix_s: u64,
    /// Why it stopped, when that needs saying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

/// File name of the resolved recipe inside a run directory.
pub const RESOLVED_RECIPE: &str = "recipe.resolved.toml";

impl RunDir {
    /// Creates the run directory of a recipe and writes its resolved recipe.
    ///
    /// Refuses a directory that already holds a run that trained at least one step unless
    /// `overwrite`, in which case that run is deleted first. (A run that failed before its
    /// first step, e.g. on a data error, is simply started again.)
    pub fn create(recipe: &Recipe, overwrite: bool) -> Result<Self, TrainError> {
        let path = Path::new(&recipe.run.out_dir).join(&recipe.run.name);
        Self::create_at(&path, recipe, overwrite)
    }

    /// Opens the run directory at `path`, or creates it (as [`Self::create_at`]) when it
    /// holds none.
    pub fn open_or_create(path: &Path, recipe: &Recipe) -> Result<Self, TrainError> {
        match Self::open(path) {
            Ok(run) => Ok(run),
            Err(_) => Self::create_at(path, recipe, false),
        }
    }

    /// [`Self::create`] at `path` instead of the recipe's `run.out_dir/run.name`.
    pub fn create_at(path: &Path, recipe: &Recipe, overwrite: bool) -> Result<Self, TrainError> {
        let path = path.to_path_buf();
        let trained = path.join("checkpoints").exists()
            || fs::metadata(path.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
        if trained || (overwrite && path.join(RESOLVED_RECIPE).exists()) {
            if !overwrite {
                return Err(TrainError::RunDir(format!(
                    "run directory `{}` already holds a run: continue it with `kiln resume {}`, \
                     or pick another `--set run.name=...`, or pass `--overwrite` to delete it",
                    path.display(),
                    path.display()
                )));
            }
            fs::remove_dir_all(&path).map_err(|source| TrainError::Io {
                path: path.clone(),
                source,
            })?;
        }
        fs::create_dir_all(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let run = Self { path };
        run.write_recipe(recipe)?;
        Ok(run)
    }

    /// Opens an existing run directory.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        if !path.join(RESOLVED_RECIPE).is_file() {
            return Err(TrainError::RunDir(format!(
                "`{}` is not a run directory (no {RESOLVED_RECIPE})",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads the run's resolved recipe with overrides applied.
    pub fn load_recipe(&self, overrides: &[String]) -> Result<LoadedRecipe, TrainError> {
        Ok(kiln_recipe::load(
            &self.path.join(RESOLVED_RECIPE),
            overrides,
        )?)
    }

    /// Writes the resolved recipe (atomically).
    pub fn write_recipe(&self, recipe: &Recipe) -> Result<(), TrainError> {
        let text = format!(
            "# Resolved recipe of this run, every default written out. `kiln resume` reads it.\n{}",
            recipe.to_toml()
        );
        self.write_atomic(RESOLVED_RECIPE, text.as_bytes())
    }

    /// The run's `status.json`, if it has a readable one.
    pub fn read_status(&self) -> Option<StatusFile> {
        let text = fs::read_to_string(self.path.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records the run's status.
    pub fn write_status(
        &self,
        status: RunStatus,
        step: u64,
        message: Option<String>,
    ) -> Result<(), TrainError> {
        let file = StatusFile {
            status,
            step,
            pid: std::process::id(),
            updated_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            message,
        };
        let json = serde_json::to_vec_pretty(&file).expect("status serializes");
        self.write_atomic("status.json", &json)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        let dst = self.path.join(name);
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &dst))
            .map_err(|source| TrainError::Io { path: dst, source })
    }
}
