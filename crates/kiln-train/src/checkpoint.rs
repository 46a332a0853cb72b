//! Checkpoints: written atomically, verified on load, the newest `keep` kept.
//!
//! ```text
//! checkpoints/step-00000040/
//!   model.safetensors       parameters by checkpoint name (f32, Burn layout)
//!   optimizer.safetensors   `m.<name>` and `v.<name>` moments, flattened (f32); for
//!                           8-bit AdamW `m8.codes.<name>` (U8) and `m8.absmax.<name>`,
//!                           the same for `v8`
//!   recipe.toml             the resolved recipe the run used
//!   state.json              counters, data cursor, schedule position, and the SHA-256 of
//!                           every other file (written last)
//! ```
//!
//! A checkpoint is written into `checkpoints/.tmp-step-…` and renamed into place, so a
//! `step-*` directory is always complete; a crash mid-write leaves only a temporary
//! directory, which the next run removes. A checkpoint whose files do not match the hashes
//! in its `state.json` is reported and skipped in favour of the previous one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use kiln_data::DataCursor;
use kiln_models::NamedTensor;

use crate::TrainError;

/// Everything but tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Input positions processed so far.
    pub tokens: u64,
    /// Target tokens trained on so far (loss mask 1).
    pub trained_tokens: u64,
    /// Training wall time accumulated over all sessions of the run, seconds.
    pub elapsed_s: f64,
    /// Where the data stream stands.
    pub cursor: DataCursor,
    /// SHA-256 of the resolved recipe.
    pub recipe_hash: String,
    /// kiln version that wrote it.
    pub kiln_version: String,
    /// For adapter runs: what the frozen base is (its `hf_dir` and a hash of its config and
    /// safetensors headers, or the seed of a random base). Resume refuses another base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// SHA-256 of every other file of the checkpoint.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Dream consolidation's statistics and learning-rate multipliers (runs with `[dream]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dream: Option<crate::dream::Dream>,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Counters and cursor.
    pub state: TrainState,
    /// Model parameters.
    pub model: BTreeMap<String, NamedTensor>,
    /// Optimizer tensors.
    pub optimizer: BTreeMap<String, NamedTensor>,
    /// The resolved recipe text.
    pub recipe_toml: String,
}

/// The identity of an adapter run's frozen base (`None` without `[adapter]`).
pub fn base_identity(recipe: &kiln_recipe::Recipe) -> Result<Option<String>, TrainError> {
    if recipe.adapter.is_none() {
        return Ok(None);
    }
    let hf_dir = recipe.model.qwen2.as_ref().and_then(|q| q.hf_dir.clone());
    let Some(dir) = hf_dir.filter(|_| {
        recipe
            .model
            .qwen2
            .as_ref()
            .is_some_and(|q| q.init_kind() == kiln_recipe::InitKind::Pretrained)
    }) else {
        return Ok(Some(format!(
            "random base from run.seed {}",
            recipe.run.seed
        )));
    };
    let dir = Path::new(&dir);
    let mut hasher = Sha256::new();
    let config = dir.join("config.json");
    hasher.update(fs::read(&config).map_err(io_err(&config))?);
    for (path, header) in kiln_models::hf::checkpoint_files(dir)? {
        hasher.update(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        for (name, info) in header {
            hasher.update(format!(
                "{name}:{}:{:?}:{}:{}",
                info.dtype, info.shape, info.offset, info.len
            ));
        }
    }
    let digest = kiln_recipe::hex(&hasher.finalize());
    Ok(Some(format!(
        "`{}` (config and safetensors headers sha256 {})",
        dir.display(),
        &digest[..16]
    )))
}

/// The name of the checkpoint directory of a step.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Checkpoint directories of a run, newest first.
pub fn list_checkpoints(run_dir: &Path) -> Vec<PathBuf> {
    let root = run_dir.join("checkpoints");
    let Ok(entries) = fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().is_dir().then_some((step, e.path()))
        })
        .collect();
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    steps.into_iter().map(|(_, p)| p).collect()
}

/// Removes temporary directories left by a checkpoint write that was killed.
pub fn remove_stale_temporaries(run_dir: &Path) -> Vec<PathBuf> {
    let root = run_dir.join("checkpoints");
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(&root) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let p = e.path();
                if fs::remove_dir_all(&p).is_ok() {
                    removed.push(p);
                }
            }
        }
    }
    removed
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    kiln_recipe::hex(&Sha256::digest(bytes))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// A pause between checkpoint files, for crash tests only (`KILN_TEST_CHECKPOINT_PAUSE_MS`).
fn test_pause() {
    if let Some(ms) = std::env::var("KILN_TEST_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Encodes named f32 tensors as safetensors.
pub fn encode_safetensors(tensors: &BTreeMap<String, NamedTensor>) -> Result<Vec<u8>, TrainError> {
    let bytes: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            if is_codes(k) {
                // 8-bit optimizer codes stay one byte each on disk.
                let b = t
                    .values
                    .iter()
                    .map(|v| {
                        u8::try_from(*v as i64)
                            .ok()
                            .filter(|c| f32::from(*c) == *v)
                            .ok_or_else(|| {
                                TrainError::Checkpoint(format!(
                                    "tensor `{k}` holds {v}, not an 8-bit code"
                                ))
                            })
                    })
                    .collect::<Result<Vec<u8>, _>>()?;
                return Ok((k.clone(), t.shape.clone(), safetensors::Dtype::U8, b));
            }
            let mut b = Vec::with_capacity(t.values.len() * 4);
            for v in &t.values {
                b.extend_from_slice(&v.to_le_bytes());
            }
            Ok((k.clone(), t.shape.clone(), safetensors::Dtype::F32, b))
        })
        .collect::<Result<_, TrainError>>()?;
    let views = bytes
        .iter()
        .map(|(k, shape, dtype, b)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), b).map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Checkpoint(format!("cannot encode tensors: {e}")))?;
    safetensors::serialize(views, None)
        .map_err(|e| TrainError::Checkpoint(format!("cannot encode tensors: {e}")))
}

/// Whether a checkpoint tensor holds 8-bit codes (`m8.codes.<name>`, `v8.codes.<name>`),
/// stored as U8.
fn is_codes(name: &str) -> bool {
    name.split('.').nth(1) == Some("codes")
}

/// Decodes a safetensors file of f32 tensors (and U8 codes, as f32).
pub fn decode_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<BTreeMap<String, NamedTensor>, TrainError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        TrainError::Checkpoint(format!("{}: invalid safetensors: {e}", path.display()))
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::U8 if is_codes(&name) => {
                view.data().iter().map(|c| f32::from(*c)).collect()
            }
            other => {
                return Err(TrainError::Checkpoint(format!(
                    "{}: tensor `{name}` is {other:?}, expected F32",
                    path.display(),
                )));
            }
        };
        out.insert(
            name,
            NamedTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// Writes a checkpoint atomically and prunes old ones; returns its directory.
pub fn write_checkpoint(
    run_dir: &Path,
    mut state: TrainState,
    model: &BTreeMap<String, NamedTensor>,
    optimizer: &BTreeMap<String, NamedTensor>,
    recipe_toml: &str,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = run_dir.join("checkpoints");
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let final_dir = root.join(step_dir_name(state.step));
    if final_dir.exists() {
        return Ok(final_dir);
    }
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        step_dir_name(state.step),
        std::process::id()
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let files = [
        ("model.safetensors", encode_safetensors(model)?),
        ("optimizer.safetensors", encode_safetensors(optimizer)?),
        ("recipe.toml", recipe_toml.as_bytes().to_vec()),
    ];
    for (name, bytes) in &files {
        write_synced(&tmp.join(name), bytes)?;
        state.files.insert((*name).to_string(), sha256_hex(bytes));
        test_pause();
    }
    let json = serde_json::to_vec_pretty(&state)
        .map_err(|e| TrainError::Checkpoint(format!("cannot encode state: {e}")))?;
    write_synced(&tmp.join("state.json"), &json)?;
    fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    // Make the rename itself durable.
    if let Ok(d) = File::open(&root) {
        let _ = d.sync_all();
    }
    for old in list_checkpoints(run_dir).into_iter().skip(keep) {
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(final_dir)
}

/// Reads and verifies one checkpoint directory.
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint, TrainError> {
    let state_path = dir.join("state.json");
    let json = fs::read(&state_path).map_err(io_err(&state_path))?;
    let state: TrainState = serde_json::from_slice(&json).map_err(|e| {
        TrainError::Checkpoint(format!("{}: unreadable: {e}", state_path.display()))
    })?;
    let mut contents = BTreeMap::new();
    for name in ["model.safetensors", "optimizer.safetensors", "recipe.toml"] {
        let path = dir.join(name);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        match state.files.get(name) {
            Some(expected) if *expected == sha256_hex(&bytes) => {}
            Some(_) => {
                return Err(TrainError::Checkpoint(format!(
                    "{}: contents do not match the hash recorded in state.json (corrupted)",
                    path.display()
                )));
            }
            None => {
                return Err(TrainError::Checkpoint(format!(
                    "{}: no hash recorded in state.json",
                    path.display()
                )));
            }
        }
        contents.insert(name, bytes);
    }
    let model = decode_safetensors(
        &contents["model.safetensors"],
        &dir.join("model.safetensors"),
    )?;
    let optimizer = decode_safetensors(
        &contents["optimizer.safetensors"],
        &dir.join("optimizer.safetensors"),
    )?;
    let recipe_toml = String::from_utf8(contents.remove("recipe.toml").unwrap_or_default())
        .map_err(|_| {
            TrainError::Checkpoint(format!("{}: recipe.toml is not UTF-8", dir.display()))
        })?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
        recipe_toml,
    })
}

/// The newest checkpoint that verifies, with a warning for each newer one that did not.
pub fn newest_valid_checkpoint(run_dir: &Path) -> (Option<Checkpoint>, Vec<String>) {
    let mut warnings = Vec::new();
    for dir in list_checkpoints(run_dir) {
        match read_checkpoint(&dir) {
            Ok(c) => return (Some(c), warnings),
            Err(e) => warnings.push(format!("skipping checkpoint `{}`: {e}", dir.display())),
        }
    }
    (None, warnings)
}

/// Finds a checkpoint of a run by name (`step-N`, `N`, or `latest`).
pub fn find_checkpoint(run_dir: &Path, which: &str) -> Result<Checkpoint, TrainError> {
    if which == "latest" {
        let (c, warnings) = newest_valid_checkpoint(run_dir);
        return c.ok_or_else(|| {
            let mut msg = format!(
                "no usable checkpoint in `{}`",
                run_dir.join("checkpoints").display()
            );
            for w in warnings {
                msg.push_str(&format!("\n  {w}"));
            }
            TrainError::Checkpoint(msg)
        });
    }
    let step: u64 = which
        .strip_prefix("step-")
        .unwrap_or(which)
        .parse()
        .map_err(|_| {
            TrainError::Checkpoint(format!(
                "`{which}` is not a checkpoint name (use step-N or latest)"
            ))
        })?;
    let dir = run_dir.join("checkpoints").join(step_dir_name(step));
    if !dir.is_dir() {
        let have: Vec<String> = list_checkpoints(run_dir)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        return Err(TrainError::Checkpoint(format!(
            "no checkpoint `{}` in `{}` (have: {})",
            step_dir_name(step),
            run_dir.display(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        )));
    }
    read_checkpoint(&dir)
}
