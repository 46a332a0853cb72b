//! A training session: opening the run (data pipeline, model, optimizer, resumed state,
//! data-parallel peers), then the loop over optimizer steps that announces phases, writes
//! `metrics.jsonl`, runs dream cycles and evaluations, checkpoints and stops. What happens
//! inside one step is [`crate::step`]; how a micro-batch runs backward is
//! [`crate::backward`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;

use kiln_data::{Batch, DataPipeline};
use kiln_models::{KilnAutodiffBackend, Model, ModelSpec, trainable_params};
use kiln_recipe::Recipe;

use crate::checkpoint::{Checkpoint, TrainState, write_checkpoint};
use crate::distributed::{Peer, Topology};
use crate::dream::Dream;
use crate::eval::evaluate;
use crate::metrics::MetricsLog;
use crate::optim::AdamW;
use crate::run::{RunDir, RunStatus};
use crate::schedule::Schedule;
use crate::step::{StepReport, StepState, Stepper};
use crate::{Event, Observer, Outcome, StepMetrics, TrainError};

/// When a training session should stop early (always after a whole step, with a
/// checkpoint, so the run can be resumed).
#[derive(Debug)]
pub struct Control<'a> {
    /// Raised by a signal handler.
    pub stop: &'a AtomicBool,
    /// Stop after this many optimizer steps in this session.
    pub stop_after_steps: Option<u64>,
}

/// Trains a recipe in a run directory, from scratch or from a checkpoint.
///
/// Returns when every phase is done, when `control.stop` is raised or the session's step
/// budget is spent (after finishing the current step and writing a checkpoint), or at the
/// wall-time limit.
pub fn train<B: KilnAutodiffBackend>(
    device: &B::Device,
    recipe: &Recipe,
    run: &RunDir,
    start: Option<Checkpoint>,
    observer: &mut dyn Observer,
    control: &Control<'_>,
) -> Result<Outcome, TrainError> {
    let (mut session, model) = Session::<B>::open(device, recipe, run, start, observer)?;
    session.run(model, observer, control)
}

/// Everything a session holds besides the model, which the optimizer consumes and
/// returns at every step.
struct Session<'a, B: KilnAutodiffBackend> {
    recipe: &'a Recipe,
    run: &'a RunDir,
    device: &'a B::Device,
    /// Data parallel: this process's link to the others.
    peer: Option<Peer<B::InnerBackend>>,
    /// Whether this process writes checkpoints (the only one, or rank 0).
    leader: bool,
    spec: ModelSpec,
    data: DataPipeline,
    schedule: Schedule,
    phase_steps: Vec<u64>,
    total_steps: u64,
    recipe_toml: String,
    optim: AdamW<B::InnerBackend>,
    state: TrainState,
    stepper: Stepper<'a, B>,
    metrics: MetricsLog,
    dream_log: Option<MetricsLog>,
    /// The evaluations so far, for the convergence guard.
    eval_history: Vec<(u64, f64)>,
    eval_batches: Vec<Batch>,
    limits: Limits,
    last_eval_step: Option<u64>,
}

/// One step's data: this process's micro-batches and the global batch's sizes.
struct Draw {
    batches: Vec<Batch>,
    /// Trained target tokens of the global batch.
    trained: usize,
    /// Input positions of the global batch.
    positions: u64,
}

/// When this process should stop besides the end of the run: its wall-time limit and the
/// session's step budget.
#[derive(Debug, Clone, Copy)]
struct Limits {
    started: Instant,
    wall_limit: Option<Duration>,
    session_start_step: u64,
}

impl Limits {
    /// Whether this process was asked to stop (signal) and whether it reached its time or
    /// step limit, after step `step`.
    fn stop_requests(&self, control: &Control<'_>, step: u64) -> (bool, bool) {
        (
            control.stop.load(Ordering::SeqCst),
            self.wall_limit.is_some_and(|w| self.started.elapsed() >= w)
                || control
                    .stop_after_steps
                    .is_some_and(|n| step - self.session_start_step >= n),
        )
    }
}

impl<'a, B: KilnAutodiffBackend> Session<'a, B> {
    /// Opens the run: joins the data-parallel peers, opens the data, builds or restores
    /// the model and optimizer, and writes the session's `data` rows and `status.json`.
    fn open(
        device: &'a B::Device,
        recipe: &'a Recipe,
        run: &'a RunDir,
        start: Option<Checkpoint>,
        observer: &mut dyn Observer,
    ) -> Result<(Self, Model<B>), TrainError> {
        let started = Instant::now();
        let mut peer = Topology::of(recipe)?
            .map(|t| Peer::<B::InnerBackend>::start(t, device))
            .transpose()?;
        // Without `[distributed]`, the one process is the leader.
        let leader = peer.as_ref().is_none_or(|p| p.topology().is_leader());
        let world = recipe.world() as usize;
        let spec = ModelSpec::from_recipe(recipe)?;
        let data = DataPipeline::with_log(recipe, spec.vocab_size(), &mut |m| {
            observer.event(Event::Info(m));
        })?;
        let schedule = Schedule::new(recipe);
        let phase_steps = recipe.phase_steps();
        let total_steps = recipe.total_steps();
        let recipe_toml = recipe.to_toml();

        B::seed(device, recipe.run.seed);
        let mut optim = AdamW::<B::InnerBackend>::new(&recipe.optim);
        let (model, state) = start_state::<B>(recipe, &data, &mut optim, start, device, observer)?;
        if let Some(base) = model.adapter_base() {
            observer.event(Event::Info(format!(
                "frozen base: {} weights under adapters in {:.1} MB ({:.3} bytes per weight, {}); {} trainable adapter parameters",
                base.weights,
                base.bytes as f64 / 1e6,
                base.bytes_per_weight(),
                if base.nf4 { "NF4 + double-quantized absmax" } else { "f32" },
                trainable_params(&model).values().map(|t| t.values.len()).sum::<usize>(),
            )));
        }
        // Every trainable parameter with its size, in name order: the layout of the
        // gradients the processes of a data-parallel run sum.
        let layout: Vec<(String, usize)> = match peer {
            Some(_) => trainable_params(&model)
                .into_iter()
                .map(|(name, t)| (name, t.values.len()))
                .collect(),
            None => Vec::new(),
        };
        if let Some(peer) = peer.as_mut() {
            join_peers(peer, recipe, state.step, &layout, observer)?;
        }
        // Rows past the starting step were written by a session that died before its next
        // checkpoint (or, starting from zero, before any): they are replayed, so drop them.
        let mut metrics = MetricsLog::open(run.path(), state.step)?;
        let dream_log = match recipe.dream {
            Some(_) => Some(MetricsLog::open_named(
                run.path(),
                "dream.jsonl",
                state.step,
            )?),
            None => None,
        };
        let eval_history: Vec<(u64, f64)> = crate::read_metrics(&run.path().join("metrics.jsonl"))?
            .iter()
            .filter(|r| r.get("kind").and_then(|k| k.as_str()) == Some("eval"))
            .filter_map(|r| Some((r.get("step")?.as_u64()?, r.get("eval_loss")?.as_f64()?)))
            // Rows of steps past the checkpoint are replayed (and dropped from the file).
            .filter(|(step, _)| *step <= state.step)
            .collect();
        // What each source gave this session: rows read, skipped and filtered, tokens.
        for src in data.sources() {
            let m = &src.cache().meta;
            metrics.write(
                "data",
                &serde_json::json!({
                    "step": state.step,
                    "source": src.name,
                    "rows": m.read.rows,
                    "skipped_rows": m.read.skipped,
                    "empty_shards": m.read.empty_files,
                    "filtered_documents": m.filtered_short + m.filtered_long,
                    "documents": m.documents,
                    "tokens": m.tokens,
                    "train_tokens": src.train_tokens(),
                }),
            )?;
        }
        run.write_status(RunStatus::Running, state.step, None)?;

        let eval_batches = data.eval_batches(recipe.phases[0].batch_size);
        if eval_batches.is_empty() {
            observer.event(Event::Warn(
                "no held-out documents: evaluation is skipped (raise data.eval_holdout or add documents)".to_string(),
            ));
        }
        let session_start_step = state.step;
        let stepper = Stepper {
            recipe,
            backward: crate::backward::for_recipe::<B>(&recipe.train),
            device,
            layout,
            world,
        };
        let session = Self {
            recipe,
            run,
            device,
            peer,
            leader,
            spec,
            data,
            schedule,
            phase_steps,
            total_steps,
            recipe_toml,
            optim,
            state,
            stepper,
            metrics,
            dream_log,
            eval_history,
            eval_batches,
            limits: Limits {
                started,
                wall_limit: recipe.max_wall_time(),
                session_start_step,
            },
            last_eval_step: None,
        };
        Ok((session, model))
    }

    /// The loop over optimizer steps, to the end of the run or an early stop.
    fn run(
        &mut self,
        mut model: Model<B>,
        observer: &mut dyn Observer,
        control: &Control<'_>,
    ) -> Result<Outcome, TrainError> {
        let recipe = self.recipe;
        let mut announced_phase = None;
        while self.state.step < self.total_steps {
            let step = self.state.step + 1;
            let (p, first, last) = phase_of(&self.phase_steps, step);
            let phase = &recipe.phases[p];
            let phase_name = phase.display_name(p);
            if announced_phase != Some(p) {
                observer.event(Event::PhaseStart {
                    index: p,
                    name: &phase_name,
                    first_step: step,
                    last_step: last,
                    phase_steps: last + 1 - first,
                    total_steps: self.total_steps,
                });
                announced_phase = Some(p);
            }

            let t0 = Instant::now();
            // Random ops (adapter dropout) draw from a generator reseeded at every step, so
            // a resumed run draws exactly what the uninterrupted one did.
            B::seed(
                self.device,
                recipe.run.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            let draw = self.draw(p, phase.batch_size);
            if draw.positions == 0 {
                // Every source of the phase has stopped (`on_exhausted = "stop"`): the
                // phase ends here, and the schedule moves on to the next phase's steps.
                observer.event(Event::Warn(format!(
                    "phase `{phase_name}`: every source has stopped (on_exhausted = \"stop\") after step {}; skipping to the end of the phase at step {last}",
                    step - 1
                )));
                self.state.step = last;
                continue;
            }
            let lr = self.schedule.lr(step, phase.lr_scale);
            let stops = || self.limits.stop_requests(control, step);
            let at = StepState {
                optim: &mut self.optim,
                dream: self.state.dream.as_mut(),
                peer: self.peer.as_mut(),
            };
            let report =
                match self
                    .stepper
                    .run(model, at, step, &draw.batches, draw.trained, lr, &stops)
                {
                    Ok((next, report)) => {
                        model = next;
                        report
                    }
                    Err(e) => return fail(self.run, step, e),
                };

            let dt = t0.elapsed().as_secs_f64();
            self.record_step(step, p, &draw, dt, &report, observer)?;
            self.dream_cycle(step, &model, observer)?;
            let mut converged_now = None;
            if recipe.train.eval_every > 0 && step.is_multiple_of(recipe.train.eval_every) {
                if let Some(loss) = self.evaluate(&model, step, &phase_name, observer)? {
                    self.eval_history.push((step, loss));
                }
                self.last_eval_step = Some(step);
                if recipe.train.convergence_window > 0 {
                    converged_now = converged(
                        &self.eval_history,
                        recipe.train.convergence_window,
                        recipe.train.convergence_min_improvement,
                    );
                }
            }
            if let Some(why) = converged_now {
                self.checkpoint(&model, observer)?;
                observer.event(Event::Warn(why.clone()));
                self.run
                    .write_status(RunStatus::Finished, self.state.step, Some(why))?;
                return Ok(Outcome::Converged);
            }
            if step == last {
                observer.event(Event::PhaseEnd {
                    index: p,
                    name: &phase_name,
                    counts: &self.state.cursor.counts,
                });
            }
            if step == self.total_steps {
                break;
            }
            // Data parallel, the processes stop together: on what any of them was asked.
            let (stop_now, out_of_time) = report
                .agreed_stop
                .unwrap_or_else(|| self.limits.stop_requests(control, step));
            if step.is_multiple_of(recipe.train.checkpoint_every) || stop_now || out_of_time {
                self.checkpoint(&model, observer)?;
            }
            if stop_now || out_of_time {
                let (outcome, why) = if stop_now {
                    (Outcome::Interrupted, "interrupted by signal")
                } else {
                    (
                        Outcome::Paused,
                        "stopped at the session's time or step limit",
                    )
                };
                self.run.write_status(
                    RunStatus::Interrupted,
                    self.state.step,
                    Some(why.to_string()),
                )?;
                return Ok(outcome);
            }
        }
        self.finish(&model, observer)
    }

    /// The micro-batches of the next step in phase `p`. Data parallel, every process
    /// draws the whole global batch (so the cursor stays the same everywhere) and trains
    /// on its own rows of it.
    fn draw(&mut self, p: usize, batch_size: usize) -> Draw {
        let global: Vec<Batch> = (0..self.recipe.train.grad_accum)
            .map_while(|_| {
                self.data
                    .next_batch_of(p, &mut self.state.cursor, batch_size * self.stepper.world)
            })
            .collect();
        let trained: usize = global.iter().map(Batch::trained_tokens).sum();
        let positions = global
            .iter()
            .map(|b| (b.batch_size * b.window) as u64)
            .sum::<u64>();
        let batches: Vec<Batch> = match &self.peer {
            Some(peer) => global
                .iter()
                .map(|b| b.rows(peer.shard(b.batch_size)))
                .filter(|b| b.batch_size > 0)
                .collect(),
            None => global,
        };
        Draw {
            batches,
            trained,
            positions,
        }
    }

    /// Advances the state past step `step` of phase `p` (which took `dt` seconds) and
    /// writes its `metrics.jsonl` row.
    fn record_step(
        &mut self,
        step: u64,
        p: usize,
        draw: &Draw,
        dt: f64,
        report: &StepReport,
        observer: &mut dyn Observer,
    ) -> Result<(), TrainError> {
        let (positions, trained, lr) = (draw.positions, draw.trained, report.lr);
        let phase = &self.recipe.phases[p];
        let state = &mut self.state;
        state.step = step;
        state.tokens += positions;
        state.trained_tokens += trained as u64;
        state.elapsed_s += dt;
        let tokens_per_s = positions as f64 / dt.max(1e-9);
        let row = StepMetrics {
            step,
            phase: phase.display_name(p),
            loss: report.loss,
            aux_losses: report.aux_losses.clone(),
            router_usage: report.router_usage.clone(),
            lr,
            grad_norm: report.grad_norm,
            tokens: state.tokens,
            trained_tokens: state.trained_tokens,
            tokens_per_s,
            gflops: tokens_per_s * self.spec.flops_per_token(phase.window) / 1e9,
            step_time_s: dt,
            allreduce_s: report.allreduce_s,
            elapsed_s: state.elapsed_s,
            source_trained_tokens: if state.cursor.counts.len() > 1 {
                state
                    .cursor
                    .counts
                    .iter()
                    .map(|(name, c)| (name.clone(), c.trained))
                    .collect()
            } else {
                Default::default()
            },
        };
        self.metrics.write("train", &row)?;
        observer.event(Event::Step(&row));
        Ok(())
    }

    /// A dream consolidation cycle, when the recipe has `[dream]` and one is due at `step`.
    fn dream_cycle(
        &mut self,
        step: u64,
        model: &Model<B>,
        observer: &mut dyn Observer,
    ) -> Result<(), TrainError> {
        let (Some(d), Some(cfg), Some(log)) = (
            self.state.dream.as_mut(),
            &self.recipe.dream,
            self.dream_log.as_mut(),
        ) else {
            return Ok(());
        };
        if !step.is_multiple_of(cfg.every) {
            return Ok(());
        }
        let report = d.cycle(step, cfg, &model.routers());
        log.write("dream", &report)?;
        observer.event(Event::Info(format!(
            "dream cycle {} at step {step}: {} tensors crystallized, {} dissolved, {} paths pruned{}; learning-rate multipliers {:.3}..{:.3} (mean {:.3})",
            report.cycle,
            report.crystallized.len(),
            report.dissolved.len(),
            report.pruned.len(),
            if report.pruned.is_empty() {
                String::new()
            } else {
                format!(" ({})", report.pruned.join(", "))
            },
            report.multiplier_min,
            report.multiplier_max,
            report.multiplier_mean,
        )));
        Ok(())
    }

    /// Evaluates `model` on the held-out batches and writes the `eval` row; the loss, or
    /// `None` without held-out data.
    fn evaluate(
        &mut self,
        model: &Model<B>,
        step: u64,
        phase: &str,
        observer: &mut dyn Observer,
    ) -> Result<Option<f64>, TrainError> {
        let valid = model.valid();
        let scores = evaluate(
            &valid,
            &self.eval_batches,
            self.data.tokenizer(),
            self.recipe.train.head_chunk_tokens,
            self.device,
        )?;
        if let Some(scores) = &scores {
            let row = scores.metrics(step, phase.to_string());
            self.metrics.write("eval", &row)?;
            observer.event(Event::Eval(&row));
        }
        Ok(scores.map(|s| s.loss))
    }

    /// Writes a checkpoint of the current state (on the leader only).
    fn checkpoint(&self, model: &Model<B>, observer: &mut dyn Observer) -> Result<(), TrainError> {
        if !self.leader {
            // Every process holds the same state: the leader's checkpoint is everyone's.
            return Ok(());
        }
        let dir = write_checkpoint(
            self.run.path(),
            self.state.clone(),
            // Adapter runs save only what trains; the frozen base is recorded by identity.
            &trainable_params(model),
            &self.optim.state_tensors()?,
            &self.recipe_toml,
            self.recipe.train.keep_checkpoints,
        )?;
        observer.event(Event::Checkpoint {
            step: self.state.step,
            path: &dir,
        });
        Ok(())
    }

    /// The end of the run: the final evaluation (unless this step had one), the last
    /// checkpoint, and the finished status.
    fn finish(
        &mut self,
        model: &Model<B>,
        observer: &mut dyn Observer,
    ) -> Result<Outcome, TrainError> {
        let step = self.state.step;
        let (p, _, _) = phase_of(&self.phase_steps, step.max(1));
        if self.last_eval_step != Some(step) {
            let phase = self.recipe.phases[p].display_name(p);
            self.evaluate(model, step, &phase, observer)?;
        }
        self.checkpoint(model, observer)?;
        self.run.write_status(RunStatus::Finished, step, None)?;
        if let Some(peer) = &self.peer {
            observer.event(Event::Info(format!(
                "data parallel: {:.1} s of this session's {:.1} s in all-reduces (waiting for the other processes at the start included)",
                peer.reduce_seconds(),
                self.limits.started.elapsed().as_secs_f64()
            )));
        }
        if let Some(peak) = peak_resident_bytes() {
            observer.event(Event::Info(format!(
                "peak resident memory: {:.1} MB",
                peak as f64 / 1e6
            )));
        }
        Ok(Outcome::Finished)
    }
}

/// The model and state a session starts from: restored from `start` (with the optimizer
/// state loaded into `optim`), or fresh.
fn start_state<B: KilnAutodiffBackend>(
    recipe: &Recipe,
    data: &DataPipeline,
    optim: &mut AdamW<B::InnerBackend>,
    start: Option<Checkpoint>,
    device: &B::Device,
    observer: &mut dyn Observer,
) -> Result<(Model<B>, TrainState), TrainError> {
    let recipe_hash = recipe.hash();
    let base = crate::checkpoint::base_identity(recipe)?;
    let Some(ckpt) = start else {
        let model = Model::<B>::for_training(recipe, device)?;
        let state = TrainState {
            step: 0,
            tokens: 0,
            trained_tokens: 0,
            elapsed_s: 0.0,
            cursor: data.initial_cursor(recipe.run.seed),
            recipe_hash,
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            base,
            files: BTreeMap::new(),
            dream: recipe.dream.as_ref().map(|_| Dream::default()),
        };
        return Ok((model, state));
    };
    if let (Some(saved), Some(now)) = (&ckpt.state.base, &base)
        && saved != now
    {
        return Err(TrainError::Checkpoint(format!(
            "the frozen base changed since `{}` was written: it was {saved}, it is now {now}",
            ckpt.dir.display()
        )));
    }
    let model = Model::<B>::restore(recipe, ckpt.model, device)?;
    optim
        .load_state_tensors(ckpt.optimizer, ckpt.state.step, device)
        .map_err(|e| TrainError::Checkpoint(format!("`{}`: {e}", ckpt.dir.display())))?;
    data.check_cursor(&ckpt.state.cursor)?;
    observer.event(Event::Info(format!(
        "resuming from `{}` at step {}",
        ckpt.dir.display(),
        ckpt.state.step
    )));
    let state = TrainState {
        recipe_hash,
        base,
        files: BTreeMap::new(),
        dream: recipe
            .dream
            .as_ref()
            .map(|_| ckpt.state.dream.clone().unwrap_or_default()),
        ..ckpt.state
    };
    Ok((model, state))
}

/// Waits for every process of a data-parallel run and checks that they agree on the
/// recipe, the starting step and the trainable parameters.
fn join_peers<B: burn::prelude::Backend>(
    peer: &mut Peer<B>,
    recipe: &Recipe,
    step: u64,
    layout: &[(String, usize)],
    observer: &mut dyn Observer,
) -> Result<(), TrainError> {
    let t = peer.topology().clone();
    observer.event(Event::Info(format!(
        "data parallel: rank {} of {}, waiting for the other processes (orchestrator {}, this process's data service {}:{})",
        t.rank, t.world, t.orchestrator, t.host, t.data_port
    )));
    let params: usize = layout.iter().map(|(_, n)| n).sum();
    let [a, b] = recipe_fingerprint(recipe);
    peer.agree(
        "the recipe, the starting step and the model's trainable parameters",
        &[
            a,
            b,
            step as u32,
            (step >> 32) as u32,
            layout.len() as u32,
            params as u32,
        ],
    )?;
    observer.event(Event::Info(format!(
        "data parallel: all {} processes joined at step {step}; each trains on {} of every global batch",
        t.world,
        if t.world == 1 { "all".to_string() } else { format!("1/{}", t.world) }
    )));
    Ok(())
}

/// Two 32-bit words of the recipe's hash, with the keys that differ between the processes
/// of a data-parallel run (rank, host, data port) left out.
fn recipe_fingerprint(recipe: &Recipe) -> [u32; 2] {
    let mut r = recipe.clone();
    if let Some(d) = r.distributed.as_mut() {
        d.rank = 0;
        d.host = String::new();
        d.data_port = 0;
    }
    let hash = r.hash();
    let word = |i: usize| u32::from_str_radix(&hash[i..i + 8], 16).unwrap_or(0);
    [word(0), word(8)]
}

/// Why the convergence guard stops the run, if it does: the best evaluation loss of the
/// last `window` steps is not `min_improvement` (a fraction) below the best before them.
fn converged(history: &[(u64, f64)], window: u64, min_improvement: f64) -> Option<String> {
    let &(now, _) = history.last()?;
    let cutoff = now.checked_sub(window)?;
    let best = |it: &mut dyn Iterator<Item = f64>| it.fold(f64::INFINITY, f64::min);
    let before = best(
        &mut history
            .iter()
            .filter(|(s, _)| *s <= cutoff)
            .map(|(_, l)| *l),
    );
    let recent = best(&mut history.iter().filter(|(s, _)| *s > cutoff).map(|(_, l)| *l));
    if !before.is_finite() || !recent.is_finite() {
        return None;
    }
    (recent > before * (1.0 - min_improvement)).then(|| {
        format!(
            "converged: the best eval loss of steps {}..={now} is {recent:.4}, not {:.1}% below the best before them ({before:.4}); stopping (train.convergence_window = {window}, train.convergence_min_improvement = {min_improvement})",
            cutoff + 1,
            min_improvement * 100.0
        )
    })
}

/// The phase index of optimizer step `step` (1-based), and the phase's first and last step.
pub(crate) fn phase_of(phase_steps: &[u64], step: u64) -> (usize, u64, u64) {
    let mut start = 1;
    for (i, n) in phase_steps.iter().enumerate() {
        let end = start + n - 1;
        if step <= end || i == phase_steps.len() - 1 {
            return (i, start, end);
        }
        start = end + 1;
    }
    (0, 1, 0)
}

/// The process's peak resident set size (`VmHWM`), where the OS reports it (Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Records a failed step in `status.json` and returns its error.
fn fail(run: &RunDir, step: u64, err: TrainError) -> Result<Outcome, TrainError> {
    let _ = run.write_status(
        RunStatus::Failed,
        step.saturating_sub(1),
        Some(err.to_string()),
    );
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::{converged, phase_of};

    #[test]
    fn the_convergence_guard_compares_the_last_window_with_what_came_before() {
        // Still improving by more than 1%: no stop.
        let improving = [(10, 3.0), (20, 2.5), (30, 2.2), (40, 2.0)];
        assert_eq!(converged(&improving, 20, 0.01), None);
        // The best of steps 21..=40 (2.99) is not 1% below the best before (3.0).
        let flat = [(10, 3.1), (20, 3.0), (30, 2.99), (40, 3.02)];
        let why = converged(&flat, 20, 0.01).expect("stops");
        assert!(
            why.contains("steps 21..=40") && why.contains("3.0000"),
            "{why}"
        );
        // Not enough history yet.
        assert_eq!(converged(&flat[..1], 20, 0.01), None);
    }

    #[test]
    fn phases_split_steps() {
        let steps = [3, 2];
        assert_eq!(phase_of(&steps, 1), (0, 1, 3));
        assert_eq!(phase_of(&steps, 3), (0, 1, 3));
        assert_eq!(phase_of(&steps, 4), (1, 4, 5));
        assert_eq!(phase_of(&steps, 5), (1, 4, 5));
    }
}
