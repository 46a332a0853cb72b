//! The training loop and evaluation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::prelude::*;

use kiln_data::{Batch, DataPipeline, Tokenizer};
use kiln_models::{Aux, KilnAutodiffBackend, KilnBackend, Model, ModelSpec, trainable_params};
use kiln_recipe::Recipe;

use crate::checkpoint::{Checkpoint, TrainState, write_checkpoint};
use crate::distributed::{self, Peer, StepSums, Topology};
use crate::dream::Dream;
use crate::loss::{input_tensor, masked_nll, masked_nll_rows};
use crate::metrics::MetricsLog;
use crate::optim::{AdamW, GradAccumulator};
use crate::run::{RunDir, RunStatus};
use crate::schedule::Schedule;
use crate::{EvalMetrics, Event, Observer, Outcome, StepMetrics, TrainError};

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    f64::from(t.into_scalar().elem::<f32>())
}

/// Reads named 1-D tensors back to the host in one transfer.
fn read_named<B: Backend>(items: Vec<(String, Tensor<B, 1>)>) -> Vec<(String, Vec<f32>)> {
    if items.is_empty() {
        return Vec::new();
    }
    let (names, tensors): (Vec<String>, Vec<Tensor<B, 1>>) = items.into_iter().unzip();
    let lens: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
    let values = Tensor::cat(tensors, 0)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default();
    let mut at = 0;
    names
        .into_iter()
        .zip(lens)
        .map(|(n, len)| {
            let v = values[at..at + len].to_vec();
            at += len;
            (n, v)
        })
        .collect()
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
fn phase_of(phase_steps: &[u64], step: u64) -> (usize, u64, u64) {
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

/// Loss, perplexity and bits per byte of a model on the recipe's held-out data.
fn evaluate<B: KilnBackend>(
    model: &Model<B>,
    batches: &[Batch],
    tokenizer: &dyn Tokenizer,
    head_chunk: Option<usize>,
    device: &B::Device,
) -> Option<(f64, u64, f64)> {
    let mut nll = 0.0f64;
    let mut count = 0u64;
    let mut byte_nll = 0.0f64;
    let mut bytes = 0u64;
    for batch in batches {
        let ids = input_tensor::<B>(batch, device);
        let per_token = match head_chunk {
            None => masked_nll(model.forward(ids).logits, batch, device).1,
            Some(rows) => {
                let (top, _) = model.hidden(ids);
                let parts = HeadChunks::new(top, rows)
                    .map(|(range, x)| {
                        let (t, m) = (&batch.targets[range.clone()], &batch.mask[range]);
                        masked_nll_rows(model.head(x), t, m, device).1
                    })
                    .collect();
                Tensor::cat(parts, 0)
            }
        };
        let values = per_token
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
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
    (count > 0).then(|| {
        let bpb = if bytes > 0 {
            byte_nll / std::f64::consts::LN_2 / bytes as f64
        } else {
            f64::NAN
        };
        (nll / count as f64, count, bpb)
    })
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
    let (loss, count, bpb) = evaluate(
        &model,
        &batches,
        data.tokenizer(),
        recipe.train.head_chunk_tokens,
        device,
    ).ok_or_else(|| {
        TrainError::RunDir("no held-out data to evaluate on (data.eval_holdout is 0, or every source has a single document)".to_string())
    })?;
    let steps = recipe.phase_steps();
    let (phase, _, _) = phase_of(&steps, checkpoint.state.step.max(1));
    Ok(EvalMetrics {
        step: checkpoint.state.step,
        phase: recipe.phases[phase].display_name(phase),
        eval_loss: loss,
        perplexity: loss.exp(),
        bits_per_byte: bpb,
        eval_tokens: count,
    })
}

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
    let recipe_hash = recipe.hash();

    B::seed(device, recipe.run.seed);
    let base = crate::checkpoint::base_identity(recipe)?;
    let mut optim = AdamW::<B::InnerBackend>::new(&recipe.optim);
    let mut model;
    let mut state = match start {
        Some(ckpt) => {
            if let (Some(saved), Some(now)) = (&ckpt.state.base, &base)
                && saved != now
            {
                return Err(TrainError::Checkpoint(format!(
                    "the frozen base changed since `{}` was written: it was {saved}, it is now {now}",
                    ckpt.dir.display()
                )));
            }
            model = Model::<B>::restore(recipe, ckpt.model, device)?;
            optim
                .load_state_tensors(ckpt.optimizer, ckpt.state.step, device)
                .map_err(|e| TrainError::Checkpoint(format!("`{}`: {e}", ckpt.dir.display())))?;
            data.check_cursor(&ckpt.state.cursor)?;
            observer.event(Event::Info(format!(
                "resuming from `{}` at step {}",
                ckpt.dir.display(),
                ckpt.state.step
            )));
            TrainState {
                recipe_hash: recipe_hash.clone(),
                base: base.clone(),
                files: BTreeMap::new(),
                dream: recipe
                    .dream
                    .as_ref()
                    .map(|_| ckpt.state.dream.clone().unwrap_or_default()),
                ..ckpt.state
            }
        }
        None => {
            model = Model::<B>::for_training(recipe, device)?;
            TrainState {
                step: 0,
                tokens: 0,
                trained_tokens: 0,
                elapsed_s: 0.0,
                cursor: data.initial_cursor(recipe.run.seed),
                recipe_hash: recipe_hash.clone(),
                kiln_version: env!("CARGO_PKG_VERSION").to_string(),
                base: base.clone(),
                files: BTreeMap::new(),
                dream: recipe.dream.as_ref().map(|_| Dream::default()),
            }
        }
    };
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
    // Every trainable parameter with its size, in name order: the layout of the gradients
    // the processes of a data-parallel run sum.
    let layout: Vec<(String, usize)> = match peer {
        Some(_) => trainable_params(&model)
            .into_iter()
            .map(|(name, t)| (name, t.values.len()))
            .collect(),
        None => Vec::new(),
    };
    if let Some(peer) = peer.as_mut() {
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
                state.step as u32,
                (state.step >> 32) as u32,
                layout.len() as u32,
                params as u32,
            ],
        )?;
        observer.event(Event::Info(format!(
            "data parallel: all {} processes joined at step {}; each trains on {} of every global batch",
            t.world,
            state.step,
            if t.world == 1 { "all".to_string() } else { format!("1/{}", t.world) }
        )));
    }
    // Rows past the starting step were written by a session that died before its next
    // checkpoint (or, starting from zero, before any): they are replayed, so drop them.
    let mut metrics = MetricsLog::open(run.path(), state.step)?;
    let mut dream_log = match recipe.dream {
        Some(_) => Some(MetricsLog::open_named(
            run.path(),
            "dream.jsonl",
            state.step,
        )?),
        None => None,
    };
    // The evaluations so far, for the convergence guard.
    let mut eval_history: Vec<(u64, f64)> = crate::read_metrics(&run.path().join("metrics.jsonl"))?
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
    let wall_limit = recipe.max_wall_time();
    let session_start_step = state.step;
    let mut announced_phase = None;
    let mut last_eval_step = None;

    let checkpoint = |state: &TrainState,
                      model: &Model<B>,
                      optim: &AdamW<B::InnerBackend>,
                      observer: &mut dyn Observer|
     -> Result<(), TrainError> {
        if !leader {
            // Every process holds the same state: the leader's checkpoint is everyone's.
            return Ok(());
        }
        let dir = write_checkpoint(
            run.path(),
            state.clone(),
            // Adapter runs save only what trains; the frozen base is recorded by identity.
            &trainable_params(model),
            &optim.state_tensors(),
            &recipe_toml,
            recipe.train.keep_checkpoints,
        )?;
        observer.event(Event::Checkpoint {
            step: state.step,
            path: &dir,
        });
        Ok(())
    };

    let run_eval = |model: &Model<B>,
                    step: u64,
                    phase: &str,
                    metrics: &mut MetricsLog,
                    observer: &mut dyn Observer|
     -> Result<Option<f64>, TrainError> {
        let valid = model.valid();
        let result = evaluate(
            &valid,
            &eval_batches,
            data.tokenizer(),
            recipe.train.head_chunk_tokens,
            device,
        );
        if let Some((loss, count, bpb)) = result {
            let row = EvalMetrics {
                step,
                phase: phase.to_string(),
                eval_loss: loss,
                perplexity: loss.exp(),
                bits_per_byte: bpb,
                eval_tokens: count,
            };
            metrics.write("eval", &row)?;
            observer.event(Event::Eval(&row));
        }
        Ok(result.map(|(loss, _, _)| loss))
    };

    while state.step < total_steps {
        let step = state.step + 1;
        let (p, first, last) = phase_of(&phase_steps, step);
        let phase = &recipe.phases[p];
        let phase_name = phase.display_name(p);
        if announced_phase != Some(p) {
            observer.event(Event::PhaseStart {
                index: p,
                name: &phase_name,
                first_step: step,
                last_step: last,
                phase_steps: last + 1 - first,
                total_steps,
            });
            announced_phase = Some(p);
        }

        let t0 = Instant::now();
        // Random ops (adapter dropout) draw from a generator reseeded at every step, so a
        // resumed run draws exactly what the uninterrupted one did.
        B::seed(
            device,
            recipe.run.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        // Data parallel, every process draws the whole global batch (so the cursor stays
        // the same everywhere) and trains on its own rows of it.
        let global: Vec<Batch> = (0..recipe.train.grad_accum)
            .map_while(|_| data.next_batch_of(p, &mut state.cursor, phase.batch_size * world))
            .collect();
        let trained: usize = global.iter().map(Batch::trained_tokens).sum();
        let positions = global
            .iter()
            .map(|b| (b.batch_size * b.window) as u64)
            .sum::<u64>();
        let batches: Vec<Batch> = match &peer {
            Some(peer) => global
                .iter()
                .map(|b| b.rows(peer.shard(b.batch_size)))
                .filter(|b| b.batch_size > 0)
                .collect(),
            None => global,
        };
        if positions == 0 {
            // Every source of the phase has stopped (`on_exhausted = "stop"`): the phase
            // ends here, and the schedule moves on to the next phase's steps.
            observer.event(Event::Warn(format!(
                "phase `{phase_name}`: every source has stopped (on_exhausted = \"stop\") after step {}; skipping to the end of the phase at step {last}",
                step - 1
            )));
            state.step = last;
            continue;
        }
        let denom = trained.max(1) as f64;
        let mut acc = GradAccumulator::<B::InnerBackend>::default();
        let mut loss_sum = 0.0;
        let mut aux_losses: BTreeMap<String, f64> = BTreeMap::new();
        let mut router_usage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        // Auxiliary losses are means over the micro-batches (and the processes).
        let accum = (recipe.train.grad_accum * world) as f64;
        for (k, batch) in batches.iter().enumerate() {
            let (aux, stats) = if recipe.train.activation_checkpointing {
                let seed = recipe.run.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64;
                let (value, aux, stats) = checkpointed_backward(
                    &model,
                    batch,
                    (denom, accum),
                    recipe.train.head_chunk_tokens,
                    device,
                    seed,
                    &mut acc,
                );
                loss_sum += value;
                (aux, stats)
            } else if let Some(rows) = recipe.train.head_chunk_tokens {
                let (value, aux, stats) =
                    head_chunked_backward(&model, batch, denom, accum, rows, device, &mut acc);
                loss_sum += value;
                (aux, stats)
            } else {
                let out = model.forward(input_tensor::<B>(batch, device));
                let (nll, _) = masked_nll(out.logits, batch, device);
                let mut aux = Vec::new();
                let loss = with_aux(nll.div_scalar(denom), out.aux_losses, accum, &mut aux);
                let aux = read_named(aux);
                let stats = read_named(out.stats);
                loss_sum += scalar(loss.clone());
                acc.accumulate::<B, _>(&model, loss.backward());
                (aux, stats)
            };
            for (name, v) in aux {
                *aux_losses.entry(name).or_default() +=
                    v.iter().map(|x| f64::from(*x)).sum::<f64>();
            }
            // Data parallel, dream sees the router statistics of all processes (below).
            if let (Some(d), None) = (state.dream.as_mut(), &peer) {
                d.observe_routers(&stats);
            }
            for (name, v) in stats {
                let sum = router_usage
                    .entry(name)
                    .or_insert_with(|| vec![0.0; v.len()]);
                for (s, x) in sum.iter_mut().zip(&v) {
                    *s += f64::from(*x) / batches.len() as f64;
                }
            }
        }
        let mut agreed_stop = None;
        let reduced_before = peer.as_ref().map(Peer::reduce_seconds);
        if let Some(peer) = peer.as_mut() {
            let sums = StepSums {
                loss: loss_sum,
                aux: std::mem::take(&mut aux_losses),
                usage: std::mem::take(&mut router_usage),
                interrupted: control.stop.load(Ordering::SeqCst),
                out_of_time: wall_limit.is_some_and(|w| started.elapsed() >= w)
                    || control
                        .stop_after_steps
                        .is_some_and(|n| step - session_start_step >= n),
            };
            match distributed::reduce_step(peer, step, &layout, &mut acc, sums, device) {
                Ok(r) => {
                    loss_sum = r.loss;
                    aux_losses = r.aux;
                    router_usage = r.usage;
                    agreed_stop = Some((r.interrupted, r.out_of_time));
                    if let Some(d) = state.dream.as_mut() {
                        d.observe_router_means(&router_usage, batches.len());
                    }
                }
                Err(e) => return fail(run, step, e),
            }
        }
        if !loss_sum.is_finite() {
            return fail(
                run,
                step,
                TrainError::NonFinite {
                    what: "loss",
                    value: loss_sum,
                    step,
                },
            );
        }
        let grad_norm = acc.global_norm();
        if let (Some(d), Some(cfg)) = (state.dream.as_mut(), &recipe.dream) {
            d.observe(acc.grads(), cfg.ema);
        }
        if !grad_norm.is_finite() {
            return fail(
                run,
                step,
                TrainError::NonFinite {
                    what: "gradient norm",
                    value: grad_norm,
                    step,
                },
            );
        }
        if let Some(clip) = recipe.train.clip_norm.filter(|c| grad_norm > *c) {
            acc.scale(clip / (grad_norm + 1e-6));
        }
        let lr = schedule.lr(step, phase.lr_scale);
        let multipliers = state
            .dream
            .as_ref()
            .map(Dream::multipliers)
            .unwrap_or_default();
        model = optim.step::<B, _>(model, acc.take(), lr, &multipliers);

        let dt = t0.elapsed().as_secs_f64();
        state.step = step;
        state.tokens += positions;
        state.trained_tokens += trained as u64;
        state.elapsed_s += dt;
        let tokens_per_s = positions as f64 / dt.max(1e-9);
        let row = StepMetrics {
            step,
            phase: phase_name.clone(),
            loss: loss_sum,
            aux_losses,
            router_usage,
            lr,
            grad_norm,
            tokens: state.tokens,
            trained_tokens: state.trained_tokens,
            tokens_per_s,
            gflops: tokens_per_s * spec.flops_per_token(phase.window) / 1e9,
            step_time_s: dt,
            allreduce_s: peer
                .as_ref()
                .zip(reduced_before)
                .map(|(p, before)| p.reduce_seconds() - before),
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
        metrics.write("train", &row)?;
        observer.event(Event::Step(&row));

        if let (Some(d), Some(cfg), Some(log)) =
            (state.dream.as_mut(), &recipe.dream, dream_log.as_mut())
            && step % cfg.every == 0
        {
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
        }
        let mut converged_now = None;
        if recipe.train.eval_every > 0 && step % recipe.train.eval_every == 0 {
            if let Some(loss) = run_eval(&model, step, &phase_name, &mut metrics, observer)? {
                eval_history.push((step, loss));
            }
            last_eval_step = Some(step);
            if recipe.train.convergence_window > 0 {
                converged_now = converged(
                    &eval_history,
                    recipe.train.convergence_window,
                    recipe.train.convergence_min_improvement,
                );
            }
        }
        if let Some(why) = converged_now {
            checkpoint(&state, &model, &optim, observer)?;
            observer.event(Event::Warn(why.clone()));
            run.write_status(RunStatus::Finished, state.step, Some(why))?;
            return Ok(Outcome::Converged);
        }
        if step == last {
            observer.event(Event::PhaseEnd {
                index: p,
                name: &phase_name,
                counts: &state.cursor.counts,
            });
        }
        let finished = step == total_steps;
        if finished {
            break;
        }
        // Data parallel, the processes stop together: on what any of them was asked.
        let (stop_now, out_of_time) = agreed_stop.unwrap_or_else(|| {
            (
                control.stop.load(Ordering::SeqCst),
                wall_limit.is_some_and(|w| started.elapsed() >= w)
                    || control
                        .stop_after_steps
                        .is_some_and(|n| step - session_start_step >= n),
            )
        });
        if step % recipe.train.checkpoint_every == 0 || stop_now || out_of_time {
            checkpoint(&state, &model, &optim, observer)?;
        }
        if stop_now || out_of_time {
            let (status, outcome, why) = if stop_now {
                (
                    RunStatus::Interrupted,
                    Outcome::Interrupted,
                    "interrupted by signal",
                )
            } else {
                (
                    RunStatus::Interrupted,
                    Outcome::Paused,
                    "stopped at the session's time or step limit",
                )
            };
            run.write_status(status, state.step, Some(why.to_string()))?;
            return Ok(outcome);
        }
    }

    let (p, _, _) = phase_of(&phase_steps, state.step.max(1));
    if last_eval_step != Some(state.step) {
        run_eval(
            &model,
            state.step,
            &recipe.phases[p].display_name(p),
            &mut metrics,
            observer,
        )?;
    }
    checkpoint(&state, &model, &optim, observer)?;
    run.write_status(RunStatus::Finished, state.step, None)?;
    if let Some(peer) = &peer {
        observer.event(Event::Info(format!(
            "data parallel: {:.1} s of this session's {:.1} s in all-reduces (waiting for the other processes at the start included)",
            peer.reduce_seconds(),
            started.elapsed().as_secs_f64()
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

/// One micro-batch's loss and gradients with activation checkpointing: the forward pass
/// keeps only each layer's input; the backward pass recomputes one layer at a time and
/// backpropagates through it alone (with the layer's auxiliary losses), so activations of a
/// single layer are alive at once. Each layer reseeds the backend's generator before both
/// of its passes, so its random ops (dropout, DropPath, sampled triples) draw the same
/// values in the recomputation. Returns the loss, the auxiliary losses (divided by `accum`)
/// and the layers' statistics.
#[allow(clippy::type_complexity)]
fn checkpointed_backward<B: KilnAutodiffBackend>(
    model: &Model<B>,
    batch: &Batch,
    (denom, accum): (f64, f64),
    head_chunk: Option<usize>,
    device: &B::Device,
    seed: u64,
    acc: &mut GradAccumulator<B::InnerBackend>,
) -> (f64, Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>) {
    let ids = input_tensor::<B>(batch, device);
    let n = model.num_layers();
    let layer_seed = |l: usize| seed ^ (l as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
    // The forward pass runs on a copy whose parameters track no gradients: nothing is
    // recorded, so no layer's activations outlive it (on the autodiff backend all the same,
    // so dropout and NEFTune act exactly as in the recomputation).
    let untracked = model.clone().no_grad();
    let forward_layers = untracked.layers(&ids);
    let mut forward_aux = Aux::default();
    B::seed(device, layer_seed(n));
    let mut inputs = vec![untracked.embed(ids.clone())];
    for l in 0..n {
        B::seed(device, layer_seed(l));
        let y = forward_layers.layer(l, inputs[l].clone(), &mut forward_aux);
        inputs.push(y);
    }
    let top = inputs.pop().expect("the last layer's output");
    let (mut value, mut upstream) =
        head_backward(model, top, batch, denom, head_chunk, device, acc);
    let layers = model.layers(&ids);
    let mut aux_losses = Vec::new();
    for l in (0..n).rev() {
        B::seed(device, layer_seed(l));
        let x = inputs.pop().expect("layer input").require_grad();
        let mut aux = Aux::default();
        let y = layers.layer(l, x.clone(), &mut aux);
        let objective = (y * Tensor::from_inner(upstream)).sum();
        let objective = with_aux(objective, aux.losses, accum, &mut aux_losses);
        let grads = objective.backward();
        upstream = x.grad(&grads).expect("the layer's input gradient");
        acc.accumulate::<B, _>(model, grads);
    }
    if model.embedding_trains() {
        let grads = (model.embed(ids) * Tensor::from_inner(upstream))
            .sum()
            .backward();
        acc.accumulate::<B, _>(model, grads);
    }
    let aux_losses = read_named(aux_losses);
    value += named_sum(&aux_losses);
    (value, aux_losses, read_named(forward_aux.stats))
}

/// One micro-batch's forward and backward without activation checkpointing, with the head
/// applied `rows` tokens at a time ([`head_backward`]): the layers' graph is kept whole,
/// and their backward runs once, from the gathered gradient of their output. Returns what
/// [`checkpointed_backward`] returns.
#[allow(clippy::type_complexity)]
fn head_chunked_backward<B: KilnAutodiffBackend>(
    model: &Model<B>,
    batch: &Batch,
    denom: f64,
    accum: f64,
    rows: usize,
    device: &B::Device,
    acc: &mut GradAccumulator<B::InnerBackend>,
) -> (f64, Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>) {
    let (top, aux) = model.hidden(input_tensor::<B>(batch, device));
    let (mut value, upstream) = head_backward(
        model,
        top.clone().detach(),
        batch,
        denom,
        Some(rows),
        device,
        acc,
    );
    let mut aux_losses = Vec::new();
    let objective = (top * Tensor::from_inner(upstream)).sum();
    let objective = with_aux(objective, aux.losses, accum, &mut aux_losses);
    acc.accumulate::<B, _>(model, objective.backward());
    let aux_losses = read_named(aux_losses);
    value += named_sum(&aux_losses);
    (value, aux_losses, read_named(aux.stats))
}

/// `objective` plus the auxiliary `losses`, each divided by `accum` and kept in `kept`.
fn with_aux<B: Backend>(
    objective: Tensor<B, 1>,
    losses: Vec<(String, Tensor<B, 1>)>,
    accum: f64,
    kept: &mut Vec<(String, Tensor<B, 1>)>,
) -> Tensor<B, 1> {
    losses.into_iter().fold(objective, |sum, (name, a)| {
        let a = a.div_scalar(accum);
        kept.push((name, a.clone()));
        sum + a
    })
}

/// The sum of every value of named host vectors.
fn named_sum(items: &[(String, Vec<f32>)]) -> f64 {
    items
        .iter()
        .flat_map(|(_, v)| v.iter().map(|x| f64::from(*x)))
        .sum()
}

/// The language-model loss of the head over `top` (the last layer's output, a leaf of no
/// graph) divided by `denom`, and that loss's gradient with respect to `top`. With
/// `chunk`, the head runs over that many tokens at a time and each chunk's logits are made,
/// differentiated and dropped before the next, so one chunk's `[tokens, vocab]` logits are
/// alive at once; without it, all tokens form one chunk. The head's parameter gradients
/// go to `acc`.
fn head_backward<B: KilnAutodiffBackend>(
    model: &Model<B>,
    top: Tensor<B, 3>,
    batch: &Batch,
    denom: f64,
    chunk: Option<usize>,
    device: &B::Device,
    acc: &mut GradAccumulator<B::InnerBackend>,
) -> (f64, Tensor<B::InnerBackend, 3>) {
    let dims = top.dims();
    let rows = chunk.unwrap_or(dims[0] * dims[1]);
    let mut value = 0.0;
    let mut parts = Vec::new();
    for (range, x) in HeadChunks::new(top, rows) {
        let x = x.require_grad();
        let (targets, mask) = (&batch.targets[range.clone()], &batch.mask[range]);
        let (nll, _) = masked_nll_rows(model.head(x.clone()), targets, mask, device);
        let loss = nll.div_scalar(denom);
        value += scalar(loss.clone());
        let grads = loss.backward();
        parts.push(x.grad(&grads).expect("the head's input gradient"));
        acc.accumulate::<B, _>(model, grads);
    }
    (value, Tensor::cat(parts, 1).reshape(dims))
}

/// The tokens of a `[batch, seq, hidden]` tensor, `rows` at a time in row-major order:
/// each item is the chunk's range of positions (indices into a [`Batch`]'s targets and
/// mask) and its rows as a `[1, rows, hidden]` tensor.
struct HeadChunks<B: Backend> {
    flat: Tensor<B, 2>,
    rows: usize,
    start: usize,
}

impl<B: Backend> HeadChunks<B> {
    fn new(x: Tensor<B, 3>, rows: usize) -> Self {
        let [b, t, d] = x.dims();
        Self {
            flat: x.reshape([b * t, d]),
            rows: rows.max(1),
            start: 0,
        }
    }
}

impl<B: Backend> Iterator for HeadChunks<B> {
    type Item = (std::ops::Range<usize>, Tensor<B, 3>);

    fn next(&mut self) -> Option<Self::Item> {
        let [n, d] = self.flat.dims();
        if self.start >= n {
            return None;
        }
        let range = self.start..(self.start + self.rows).min(n);
        self.start = range.end;
        let x = self.flat.clone().slice(range.clone());
        Some((range.clone(), x.reshape([1, range.len(), d])))
    }
}

/// The process's peak resident set size (`VmHWM`), where the OS reports it (Linux).
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

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
