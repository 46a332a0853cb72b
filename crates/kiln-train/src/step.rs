//! One optimizer step: every micro-batch's forward and backward pass (through the run's
//! [`Backward`] strategy), gradient accumulation, the data-parallel all-reduce, the
//! divergence checks, global-norm clipping and the AdamW update.

use std::collections::BTreeMap;

use kiln_data::Batch;
use kiln_models::{KilnAutodiffBackend, Model};
use kiln_recipe::Recipe;

use crate::TrainError;
use crate::backward::{Backward, MicroBatch, Scale};
use crate::distributed::{self, Peer, StepSums};
use crate::dream::Dream;
use crate::optim::{AdamW, GradAccumulator};

/// What an optimizer step needs that stays the same for the whole session.
pub(crate) struct Stepper<'a, B: KilnAutodiffBackend> {
    /// The recipe (seed, `[train]`, `[dream]`).
    pub recipe: &'a Recipe,
    /// How each micro-batch runs forward and backward.
    pub backward: Box<dyn Backward<B>>,
    /// The training device.
    pub device: &'a B::Device,
    /// Data parallel: every trainable parameter with its size, in name order.
    pub layout: Vec<(String, usize)>,
    /// Processes of the run (1 without `[distributed]`).
    pub world: usize,
}

/// What the optimizer step reports for `metrics.jsonl`.
#[derive(Debug)]
pub(crate) struct StepReport {
    /// Mean loss over the step's trained target tokens, auxiliary losses included.
    pub loss: f64,
    /// The auxiliary losses in `loss`, by name.
    pub aux_losses: BTreeMap<String, f64>,
    /// Router usage averaged over the step's micro-batches.
    pub router_usage: BTreeMap<String, Vec<f64>>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate of the update.
    pub lr: f64,
    /// Data parallel: the stop requests of all processes (signal, time or step limit).
    pub agreed_stop: Option<(bool, bool)>,
    /// Data parallel: seconds spent in the all-reduce.
    pub allreduce_s: Option<f64>,
}

/// The mutable state an optimizer step advances besides the model.
pub(crate) struct StepState<'s, B: KilnAutodiffBackend> {
    /// The optimizer.
    pub optim: &'s mut AdamW<B::InnerBackend>,
    /// Dream consolidation's statistics, when the recipe has `[dream]`.
    pub dream: Option<&'s mut Dream>,
    /// Data parallel: this process's link to the others.
    pub peer: Option<&'s mut Peer<B::InnerBackend>>,
}

impl<B: KilnAutodiffBackend> Stepper<'_, B> {
    /// Optimizer step `step` over this process's micro-batches `batches`, which hold
    /// `trained` target tokens over all processes, with learning rate `lr`. `stops` says
    /// whether this process was asked to stop (signal) or reached its time or step limit;
    /// data parallel, it is asked once the gradients are ready. On error the model is
    /// dropped: the run cannot go on.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        model: Model<B>,
        at: StepState<'_, B>,
        step: u64,
        batches: &[Batch],
        trained: usize,
        lr: f64,
        stops: &dyn Fn() -> (bool, bool),
    ) -> Result<(Model<B>, StepReport), TrainError> {
        let StepState {
            optim,
            mut dream,
            peer,
        } = at;
        let (recipe, device) = (self.recipe, self.device);
        let denom = trained.max(1) as f64;
        // Auxiliary losses are means over the micro-batches (and the processes).
        let scale = Scale {
            denom,
            accum: (recipe.train.grad_accum * self.world) as f64,
        };
        let mut acc = GradAccumulator::<B::InnerBackend>::default();
        let mut loss_sum = 0.0;
        let mut aux_losses: BTreeMap<String, f64> = BTreeMap::new();
        let mut router_usage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (k, batch) in batches.iter().enumerate() {
            let seed = recipe.run.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ k as u64;
            let micro = self.backward.run(MicroBatch {
                model: &model,
                batch,
                scale,
                seed,
                device,
                acc: &mut acc,
            })?;
            loss_sum += micro.loss;
            for (name, v) in micro.aux_losses {
                *aux_losses.entry(name).or_default() +=
                    v.iter().map(|x| f64::from(*x)).sum::<f64>();
            }
            // Data parallel, dream sees the router statistics of all processes (below).
            if let (Some(d), None) = (dream.as_deref_mut(), &peer) {
                d.observe_routers(&micro.stats);
            }
            for (name, v) in micro.stats {
                let sum = router_usage
                    .entry(name)
                    .or_insert_with(|| vec![0.0; v.len()]);
                for (s, x) in sum.iter_mut().zip(&v) {
                    *s += f64::from(*x) / batches.len() as f64;
                }
            }
        }
        let mut agreed_stop = None;
        let mut allreduce_s = None;
        if let Some(peer) = peer {
            let before = peer.reduce_seconds();
            let (interrupted, out_of_time) = stops();
            let sums = StepSums {
                loss: loss_sum,
                aux: std::mem::take(&mut aux_losses),
                usage: std::mem::take(&mut router_usage),
                interrupted,
                out_of_time,
            };
            let r = distributed::reduce_step(peer, step, &self.layout, &mut acc, sums, device)?;
            loss_sum = r.loss;
            aux_losses = r.aux;
            router_usage = r.usage;
            agreed_stop = Some((r.interrupted, r.out_of_time));
            if let Some(d) = dream.as_deref_mut() {
                d.observe_router_means(&router_usage, batches.len());
            }
            allreduce_s = Some(peer.reduce_seconds() - before);
        }
        if !loss_sum.is_finite() {
            return Err(TrainError::NonFinite {
                what: "loss",
                value: loss_sum,
                step,
            });
        }
        let grad_norm = acc.global_norm();
        if let (Some(d), Some(cfg)) = (dream.as_deref_mut(), &recipe.dream) {
            d.observe(acc.grads(), cfg.ema)?;
        }
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "gradient norm",
                value: grad_norm,
                step,
            });
        }
        if let Some(clip) = recipe.train.clip_norm.filter(|c| grad_norm > *c) {
            acc.scale(clip / (grad_norm + 1e-6));
        }
        let multipliers = dream.as_deref().map(Dream::multipliers).unwrap_or_default();
        let model = optim.step::<B, _>(model, acc.take(), lr, &multipliers)?;
        Ok((
            model,
            StepReport {
                loss: loss_sum,
                aux_losses,
                router_usage,
                grad_norm,
                lr,
                agreed_stop,
                allreduce_s,
            },
        ))
    }
}
