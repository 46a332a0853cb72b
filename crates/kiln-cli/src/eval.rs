//! `kiln eval RUN_DIR`: a checkpoint's loss, perplexity and bits per byte on the recipe's
//! held-out data, as JSON on stdout (`--tool-calls` is `tooleval.rs`).

use std::path::Path;

use anyhow::Result;
use kiln_models::KilnAutodiffBackend;
use kiln_recipe::Recipe;
use kiln_train::checkpoint::find_checkpoint;
use kiln_train::{Checkpoint, RunDir};

use crate::backend::{Job, dispatch};

/// Evaluates checkpoint `checkpoint` (`step-N`, `N` or `latest`) of `run_dir` on the run's
/// backend: a summary line on stderr, the metrics on stdout.
pub fn eval(run_dir: &Path, checkpoint: &str) -> Result<()> {
    let run = RunDir::open(run_dir)?;
    let recipe = run.load_recipe(&[])?.recipe;
    let ckpt = find_checkpoint(run_dir, checkpoint)?;
    let metrics = dispatch(
        &recipe,
        EvalJob {
            recipe: &recipe,
            checkpoint: ckpt,
        },
    )?;
    eprintln!(
        "step {} | eval_loss {:.4} | perplexity {:.2} | bits/byte {:.4} | {} tokens",
        metrics.step,
        metrics.eval_loss,
        metrics.perplexity,
        metrics.bits_per_byte,
        metrics.eval_tokens
    );
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(())
}

/// The held-out evaluation, run without autodiff on the recipe's backend.
struct EvalJob<'a> {
    recipe: &'a Recipe,
    checkpoint: Checkpoint,
}

impl Job for EvalJob<'_> {
    type Output = kiln_train::EvalMetrics;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        Ok(kiln_train::evaluate_checkpoint::<B::InnerBackend>(
            &device,
            self.recipe,
            self.checkpoint,
        )?)
    }
}
