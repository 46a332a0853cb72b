//! Evaluation on held-out data: loss, perplexity and bits per byte, during training and of
//! a saved checkpoint.

use kiln_data::{Batch, DataPipeline, Tokenizer};
use kiln_models::{KilnBackend, Model, ModelSpec};
use kiln_recipe::Recipe;

use crate::backward::per_token_nll;
use crate::checkpoint::Checkpoint;
use crate::session::phase_of;
use crate::{EvalMetrics, TrainError};

/// A model's scores on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scores {
    /// Mean cross-entropy over the scored tokens (nats per token).
    pub loss: f64,
    /// Target tokens scored.
    pub tokens: u64,
    /// Bits per byte of text (special tokens excluded); NaN without any byte.
    pub bits_per_byte: f64,
}

/// The scores of `model` on `batches`, or `None` when no batch has a trained target.
/// With `head_chunk`, the head runs that many tokens at a time, as in training.
pub(crate) fn evaluate<B: KilnBackend>(
    model: &Model<B>,
    batches: &[Batch],
    tokenizer: &dyn Tokenizer,
    head_chunk: Option<usize>,
    device: &B::Device,
) -> Result<Option<Scores>, TrainError> {
    let mut nll = 0.0f64;
    let mut count = 0u64;
    let mut byte_nll = 0.0f64;
    let mut bytes = 0u64;
    for (k, batch) in batches.iter().enumerate() {
        let per_token = per_token_nll(model, batch, head_chunk, device);
        let values = crate::read_back(per_token.into_data(), || {
            format!("the per-token losses of held-out batch `{k}`")
        })?;
        for ((loss, mask), target) in values.iter().zip(&batch.mask).zip(&batch.targets) {
            if *mask > 0.0 {
                nll += f64::from(*loss);
                count += 1;
                let nb = tokenizer.token_bytes(*target) as u64;
                if nb > 0 {
                    byte_nll += f64::from(*loss);
                    bytes += nb;
                }
            }
        }
    }
    Ok((count > 0).then(|| {
        let bits_per_byte = if bytes > 0 {
            byte_nll / std::f64::consts::LN_2 / bytes as f64
        } else {
            f64::NAN
        };
        Scores {
            loss: nll / count as f64,
            tokens: count,
            bits_per_byte,
        }
    }))
}

impl Scores {
    /// The `metrics.jsonl` row of these scores at `step` in phase `phase`.
    pub fn metrics(&self, step: u64, phase: String) -> EvalMetrics {
        EvalMetrics {
            step,
            phase,
            eval_loss: self.loss,
            perplexity: self.loss.exp(),
            bits_per_byte: self.bits_per_byte,
            eval_tokens: self.tokens,
        }
    }
}

/// Evaluates a checkpoint of a run on its held-out data.
pub fn evaluate_checkpoint<B: KilnBackend>(
    device: &B::Device,
    recipe: &Recipe,
    checkpoint: Checkpoint,
) -> Result<EvalMetrics, TrainError> {
    let spec = ModelSpec::from_recipe(recipe)?;
    let data = DataPipeline::new(recipe, spec.vocab_size())?;
    let model = Model::<B>::restore(recipe, checkpoint.model, device)?;
    let batches = data.eval_batches(recipe.phases[0].batch_size);
    let scores = evaluate(
        &model,
        &batches,
        data.tokenizer(),
        recipe.train.head_chunk_tokens,
        device,
    )?
    .ok_or_else(|| {
        TrainError::RunDir("no held-out data to evaluate on (data.eval_holdout is 0, or every source has a single document)".to_string())
    })?;
    let steps = recipe.phase_steps();
    let (phase, _, _) = phase_of(&steps, checkpoint.state.step.max(1));
    Ok(scores.metrics(
        checkpoint.state.step,
        recipe.phases[phase].display_name(phase),
    ))
}
