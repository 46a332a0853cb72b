//! `kiln resume RUN_DIR`: continues a run from its newest complete checkpoint, refusing a
//! recipe that differs from the one the checkpoint was written with unless asked to accept it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use kiln_recipe::Recipe;
use kiln_train::checkpoint::{newest_valid_checkpoint, remove_stale_temporaries};
use kiln_train::{Checkpoint, RunDir};

use crate::train::{peer_dir, peer_rank, run_training};

/// Opens `run_dir`, applies `set` to its recipe, tidies unfinished checkpoint writes and
/// trains on from the newest valid checkpoint (or from step 0 when there is none).
pub fn resume(
    run_dir: &Path,
    set: &[String],
    allow_recipe_change: bool,
    stop_after: Option<u64>,
) -> Result<ExitCode> {
    let shared = RunDir::open(run_dir)?;
    let loaded = shared.load_recipe(set)?;
    crate::load::print_warnings(&loaded);
    let rank = peer_rank(&loaded.recipe)?.unwrap_or(0);
    let run = if rank > 0 {
        RunDir::open_or_create(&peer_dir(run_dir, rank), &loaded.recipe)?
    } else {
        shared
    };
    // Only the leader tidies the shared directory.
    let stale = if rank == 0 {
        remove_stale_temporaries(run_dir)
    } else {
        Vec::new()
    };
    for removed in stale {
        eprintln!(
            "removed an unfinished checkpoint write: {}",
            removed.display()
        );
    }
    let (checkpoint, warnings) = newest_valid_checkpoint(run_dir);
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if let Some(ckpt) = &checkpoint {
        check_recipe_change(ckpt, &loaded.recipe, allow_recipe_change)?;
    } else {
        eprintln!(
            "no complete checkpoint in {}: starting the run from step 0",
            run_dir.display()
        );
    }
    run.write_recipe(&loaded.recipe)?;
    run_training(loaded.recipe, run, checkpoint, stop_after)
}

/// Refuses to resume `ckpt` with a `recipe` that differs from the one it was written with,
/// unless `allow`, and then warns with every changed key.
fn check_recipe_change(ckpt: &Checkpoint, recipe: &Recipe, allow: bool) -> Result<()> {
    let saved = kiln_recipe::from_str(&ckpt.recipe_toml, &ckpt.dir.join("recipe.toml"), &[])
        .context("reading the checkpoint's recipe")?;
    let changes = kiln_recipe::resume_changes(&saved.recipe, recipe);
    if changes.is_empty() {
        return Ok(());
    }
    if !allow {
        bail!(
            "the recipe differs from the one checkpoint `{}` was written with:\n  {}\n\
             resume with the original recipe, or pass --allow-recipe-change to continue with the new one",
            ckpt.dir.display(),
            changes.join("\n  ")
        );
    }
    eprintln!(
        "warning: continuing with a changed recipe:\n  {}",
        changes.join("\n  ")
    );
    Ok(())
}
