//! `kiln train`: a recipe from scratch into a new run directory; and the training run that
//! `kiln resume` continues as well: the signal handlers, the device of each data-parallel
//! process, and the exit status of each way a run ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use kiln_models::KilnAutodiffBackend;
use kiln_recipe::Recipe;
use kiln_train::{Checkpoint, Control, Outcome, RunDir};

use crate::backend::{self, Job};
use crate::progress::Progress;

/// Exit status when a run stopped on a signal (after writing a checkpoint).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status when a run stopped at `run.max_wall_time` or `--stop-after` (after writing a
/// checkpoint).
const EXIT_PAUSED: u8 = 75;

/// `kiln train RECIPE`: creates the run directory (refusing an existing one unless
/// `overwrite`) and trains from step 0.
pub fn train(
    recipe: &Path,
    set: &[String],
    out: Option<&Path>,
    overwrite: bool,
    stop_after: Option<u64>,
) -> Result<ExitCode> {
    let mut set = set.to_vec();
    if let Some(out) = out {
        set.push(format!("run.out_dir={}", toml_string(out)));
    }
    let loaded = crate::load::load(recipe, &set, true)?;
    let run = match peer_rank(&loaded.recipe)? {
        // A data-parallel process other than the leader logs into a directory of
        // its own beside the run's, which the leader alone creates and writes.
        Some(rank) if rank > 0 => {
            let shared = Path::new(&loaded.recipe.run.out_dir).join(&loaded.recipe.run.name);
            RunDir::create_at(&peer_dir(&shared, rank), &loaded.recipe, overwrite)?
        }
        _ => RunDir::create(&loaded.recipe, overwrite)?,
    };
    eprintln!(
        "training `{}` ({} on {}) into {}",
        recipe.display(),
        loaded.recipe.model.family.as_str(),
        loaded.recipe.run.backend.as_str(),
        run.path().display()
    );
    run_training(loaded.recipe, run, None, stop_after)
}

/// A path as a TOML string literal (for `--out`).
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// The training loop, run on the recipe's backend.
struct TrainJob<'a> {
    recipe: &'a Recipe,
    run: &'a RunDir,
    start: Option<Checkpoint>,
    stop: Arc<AtomicBool>,
    stop_after: Option<u64>,
}

impl Job for TrainJob<'_> {
    type Output = Outcome;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Outcome> {
        let mut progress = Progress::new();
        let control = Control {
            stop: &self.stop,
            stop_after_steps: self.stop_after,
        };
        let result = kiln_train::train::<B>(
            &device,
            self.recipe,
            self.run,
            self.start,
            &mut progress,
            &control,
        );
        progress.finish();
        Ok(result?)
    }
}

/// This process's rank when the recipe trains data-parallel.
pub fn peer_rank(recipe: &Recipe) -> Result<Option<u32>> {
    Ok(kiln_train::distributed::Topology::of(recipe)?.map(|t| t.rank))
}

/// The directory a data-parallel process of rank `rank > 0` logs into, beside the run's.
pub fn peer_dir(run: &Path, rank: u32) -> PathBuf {
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    run.with_file_name(format!("{name}.rank-{rank}"))
}

/// Trains `recipe` into `run` from `start` (step 0 when `None`) until it finishes, converges,
/// is interrupted or pauses, and says which with its exit status.
pub fn run_training(
    recipe: Recipe,
    run: RunDir,
    start: Option<Checkpoint>,
    stop_after: Option<u64>,
) -> Result<ExitCode> {
    backend::check_training(&recipe)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handler")?;
    }
    // Data parallel on CUDA, each process of a machine takes its own device (unless the
    // recipe names one).
    let device = match &recipe.distributed {
        Some(d) if recipe.run.device == "cuda" => format!(
            "cuda:{}",
            peer_rank(&recipe)?.unwrap_or(0) % d.devices_per_node.max(1)
        ),
        _ => recipe.run.device.clone(),
    };
    let outcome = backend::dispatch_on(
        recipe.run.backend,
        &device,
        recipe.run.fusion,
        TrainJob {
            recipe: &recipe,
            run: &run,
            start,
            stop,
            stop_after,
        },
    )
    .with_context(|| format!("run {}", run.path().display()))?;
    let dir = run.path().display();
    match outcome {
        Outcome::Finished => {
            eprintln!("done: {dir}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Converged => {
            eprintln!("done (converged, see status.json): {dir}");
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted => {
            eprintln!("interrupted: checkpoint written; continue with `kiln resume {dir}`");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
        Outcome::Paused => {
            eprintln!(
                "stopped at the time or step limit: checkpoint written; continue with `kiln resume {dir}`"
            );
            Ok(ExitCode::from(EXIT_PAUSED))
        }
    }
}
