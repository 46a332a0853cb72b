//! kiln-train: the one training loop every model family shares.
//!
//! ```text
//! batch --> model.forward --> logits + auxiliary losses --> masked cross-entropy
//!       --> backward --> accumulate --> global-norm clip --> AdamW --> schedule step
//!       --> metrics.jsonl / observer --> checkpoint (atomic) every N steps
//! ```
//!
//! The loop is generic over the Burn backend; only the CLI picks one. It never touches the
//! terminal: progress goes to an [`Observer`].
//!
//! A run session (`session.rs`) opens the run and drives the loop over optimizer steps;
//! one optimizer step (`step.rs`) runs every micro-batch through the run's [`backward`]
//! strategy (plain, head chunks, activation checkpointing), then clips and updates;
//! evaluation (`eval.rs`) shares the backward strategies' head.

pub mod backward;
pub mod checkpoint;
pub mod distributed;
pub mod dream;
mod eval;
pub mod loss;
mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;
mod session;
mod step;

use std::path::PathBuf;

use serde::Serialize;

pub use checkpoint::{Checkpoint, TrainState};
pub use eval::evaluate_checkpoint;
pub use metrics::read_metrics;
pub use run::{RunDir, RunStatus, StatusFile};
pub use session::{Control, peak_resident_bytes, train};

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Recipe problem.
    #[error(transparent)]
    Recipe(#[from] kiln_recipe::RecipeError),
    /// Data problem.
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    /// Model problem.
    #[error(transparent)]
    Model(#[from] kiln_models::ModelError),
    /// A file operation failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The loss or gradient norm stopped being finite.
    #[error(
        "{what} is {value} at step {step}: training diverged (no checkpoint of this state was written; lower optim.lr or set train.clip_norm, then resume from the last checkpoint)"
    )]
    NonFinite {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The optimizer step.
        step: u64,
    },
    /// The run directory is in a state the command cannot use.
    #[error("{0}")]
    RunDir(String),
    /// Data-parallel training failed: a peer died or hangs, or the processes disagree.
    #[error("distributed: {0}")]
    Distributed(String),
    /// A tensor could not be read back from the device to the host.
    #[error("could not read back {what} from the device: {reason}")]
    Readback {
        /// What was read (names the tensor or tensors).
        what: String,
        /// Why it failed, as the backend says.
        reason: String,
    },
}

/// The values of a tensor's data as f32 on the host, or [`TrainError::Readback`] naming
/// `what` was read: a failed read must stop the run, never pass for an empty tensor.
pub(crate) fn read_back(
    data: burn::tensor::TensorData,
    what: impl FnOnce() -> String,
) -> Result<Vec<f32>, TrainError> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| TrainError::Readback {
            what: what(),
            reason: format!("{e:?}"),
        })
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every phase completed.
    Finished,
    /// Stopped on request (signal); a checkpoint was written.
    Interrupted,
    /// Stopped at `run.max_wall_time` or the session's step limit; a checkpoint was written.
    Paused,
    /// Stopped by the convergence guard (`train.convergence_window`): the evaluation loss
    /// stopped improving. A checkpoint was written; the run counts as finished.
    Converged,
}

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Phase name.
    pub phase: String,
    /// Mean loss over trained target tokens of the step (auxiliary losses included).
    pub loss: f64,
    /// The auxiliary losses in `loss`, by name (e.g. MoA's `triangle` and `balance`):
    /// the language-model loss is `loss` minus their sum.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub aux_losses: std::collections::BTreeMap<String, f64>,
    /// Per router (MoA): the fraction of tokens that kept each path, then the mean top
    /// router probability, averaged over the step's micro-batches.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub router_usage: std::collections::BTreeMap<String, Vec<f64>>,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input positions processed since the start of the run.
    pub tokens: u64,
    /// Target tokens trained on since the start of the run.
    pub trained_tokens: u64,
    /// Input positions per second over this step.
    pub tokens_per_s: f64,
    /// Achieved training GFLOP/s by the model's FLOPs-per-token estimate.
    pub gflops: f64,
    /// Seconds this step took.
    pub step_time_s: f64,
    /// Data parallel: seconds of the step spent in the all-reduce (waiting for the other
    /// processes included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
    /// Training seconds since the start of the run (all sessions).
    pub elapsed_s: f64,
    /// Per source: target tokens trained on since the start of the run (omitted with a
    /// single source).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub source_trained_tokens: std::collections::BTreeMap<String, u64>,
}

/// An evaluation on held-out data.
#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    /// Optimizer step evaluated at.
    pub step: u64,
    /// Phase name.
    pub phase: String,
    /// Mean cross-entropy (nats per token).
    pub eval_loss: f64,
    /// `exp(eval_loss)`.
    pub perplexity: f64,
    /// Bits per byte of text (special tokens excluded).
    pub bits_per_byte: f64,
    /// Target tokens scored.
    pub eval_tokens: u64,
}

/// Something that happened during training, for progress display.
#[derive(Debug)]
pub enum Event<'a> {
    /// Informational message.
    Info(String),
    /// A warning.
    Warn(String),
    /// A phase starts (or resumes) at `first_step`.
    PhaseStart {
        /// Phase index.
        index: usize,
        /// Phase name.
        name: &'a str,
        /// First step this session runs in the phase.
        first_step: u64,
        /// Last step of the phase.
        last_step: u64,
        /// Steps in the phase.
        phase_steps: u64,
        /// Steps of the whole run.
        total_steps: u64,
    },
    /// A step finished.
    Step(&'a StepMetrics),
    /// An evaluation finished.
    Eval(&'a EvalMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// Step.
        step: u64,
        /// Directory.
        path: &'a std::path::Path,
    },
    /// A phase ended; per-source token counts so far.
    PhaseEnd {
        /// Phase index.
        index: usize,
        /// Phase name.
        name: &'a str,
        /// Counts per source.
        counts: &'a std::collections::BTreeMap<String, kiln_data::SourceCounts>,
    },
}

/// Receives training events (the CLI draws progress bars or prints lines).
pub trait Observer {
    /// Handles one event.
    fn event(&mut self, event: Event<'_>);
}

/// An observer that ignores everything (tests, benchmarks).
#[derive(Debug, Default)]
pub struct Silent;

impl Observer for Silent {
    fn event(&mut self, _event: Event<'_>) {}
}
