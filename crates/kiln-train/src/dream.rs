//! Dream consolidation (DiscoverLM): every `dream.every` steps, turn what the last steps'
//! gradients and routers showed into per-tensor learning-rate multipliers.
//!
//! Between cycles, [`Dream::observe`] keeps for each parameter tensor its last gradient RMS
//! and bias-corrected exponential averages of the RMS and of its *jitter*, the step-to-step
//! change `|rms_t - rms_(t-1)|` (three numbers per tensor, not a copy of the gradients), and
//! [`Dream::observe_routers`] sums the routers' path usage and confidence. The statistic is
//! the relative jitter, `mean jitter / mean RMS`: a gradient that shrinks smoothly as
//! training settles has little jitter (a plain coefficient of variation would count that
//! trend as variance), one that swings from step to step has a lot. A cycle
//! ([`Dream::cycle`]):
//!
//! - **crystallize**: a tensor whose relative jitter is below `crystallize_below` has
//!   settled; its multiplier shrinks by `crystallize_factor`;
//! - **dissolve**: one whose relative jitter exceeds `dissolve_above` oscillates; its
//!   multiplier grows by `dissolve_factor`;
//! - **prune**: the tensors of a router path kept by fewer tokens than `prune_below` of its
//!   fair share (`top_k / paths`) since the last cycle shrink by `prune_factor`;
//! - **diagnose**: the report records every router's usage and confidence.
//!
//! Multipliers stay in `[min_multiplier, max_multiplier]`; the optimizer multiplies each
//! tensor's learning rate by its multiplier. The whole state is part of the checkpoint, so
//! a resumed run consolidates exactly as the uninterrupted one.

use std::collections::BTreeMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use kiln_models::RouterPaths;
use kiln_recipe::DreamSection;

use crate::TrainError;

/// Gradient statistics and multiplier of one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// Exponential average of the gradient RMS (not bias-corrected).
    pub mean: f64,
    /// Exponential average of `|rms_t - rms_(t-1)|` (not bias-corrected; from the second
    /// step on).
    pub jitter: f64,
    /// The last step's gradient RMS.
    pub last: f64,
    /// Steps observed.
    pub steps: u64,
    /// Learning-rate multiplier.
    pub multiplier: f64,
}

/// Router statistics summed since the last cycle.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RouterSums {
    /// Per path usage, then confidence, summed over micro-batches.
    pub sums: Vec<f64>,
    /// Micro-batches summed.
    pub count: u64,
}

/// Everything dream consolidation carries from step to step (checkpointed).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Dream {
    /// Per parameter tensor.
    pub tensors: BTreeMap<String, TensorStats>,
    /// Per router statistic.
    pub routers: BTreeMap<String, RouterSums>,
    /// Cycles run.
    pub cycles: u64,
}

/// One router in a cycle's report.
#[derive(Debug, Clone, Serialize)]
pub struct RouterReport {
    /// Mean fraction of tokens that kept each path since the last cycle.
    pub usage: Vec<f64>,
    /// Mean top router probability.
    pub confidence: f64,
}

/// One cycle, as written to `dream.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct DreamReport {
    /// Optimizer step of the cycle.
    pub step: u64,
    /// Cycle number (1-based).
    pub cycle: u64,
    /// Tensors whose learning rate was lowered as settled.
    pub crystallized: Vec<String>,
    /// Tensors whose learning rate was raised as oscillating.
    pub dissolved: Vec<String>,
    /// Router paths pruned (their tensors' learning rate lowered).
    pub pruned: Vec<String>,
    /// Diagnosis of every router.
    pub routers: BTreeMap<String, RouterReport>,
    /// Smallest, mean and largest multiplier after the cycle.
    pub multiplier_min: f64,
    /// Mean multiplier.
    pub multiplier_mean: f64,
    /// Largest multiplier.
    pub multiplier_max: f64,
    /// Every multiplier that is not 1.
    pub multipliers: BTreeMap<String, f64>,
}

impl Dream {
    /// Records one optimizer step's gradients (summed over micro-batches, before clipping).
    pub fn observe<B: Backend>(
        &mut self,
        grads: &BTreeMap<String, Tensor<B, 1>>,
        ema: f64,
    ) -> Result<(), TrainError> {
        if grads.is_empty() {
            return Ok(());
        }
        // One read for every tensor: the mean squares, concatenated.
        let squares: Vec<Tensor<B, 1>> =
            grads.values().map(|g| g.clone().square().mean()).collect();
        let values = crate::read_back(Tensor::cat(squares, 0).into_data(), || {
            "the gradients' mean squares for dream consolidation".to_string()
        })?;
        for (name, ms) in grads.keys().zip(values) {
            let rms = f64::from(ms).sqrt();
            let s = self.tensors.entry(name.clone()).or_insert(TensorStats {
                mean: 0.0,
                jitter: 0.0,
                last: 0.0,
                steps: 0,
                multiplier: 1.0,
            });
            if s.steps > 0 {
                s.jitter = ema * s.jitter + (1.0 - ema) * (rms - s.last).abs();
            }
            s.mean = ema * s.mean + (1.0 - ema) * rms;
            s.last = rms;
            s.steps += 1;
        }
        Ok(())
    }

    /// Records one micro-batch's router statistics (`[paths + 1]`: usage, confidence).
    pub fn observe_routers(&mut self, stats: &[(String, Vec<f32>)]) {
        for (name, values) in stats {
            let r = self.routers.entry(name.clone()).or_default();
            if r.sums.len() != values.len() {
                r.sums = vec![0.0; values.len()];
            }
            for (s, v) in r.sums.iter_mut().zip(values) {
                *s += f64::from(*v);
            }
            r.count += 1;
        }
    }

    /// [`Self::observe_routers`] for `batches` micro-batches at once, given each router's
    /// statistics averaged over them (and, data parallel, over the processes).
    pub fn observe_router_means(&mut self, means: &BTreeMap<String, Vec<f64>>, batches: usize) {
        for (name, values) in means {
            let r = self.routers.entry(name.clone()).or_default();
            if r.sums.len() != values.len() {
                r.sums = vec![0.0; values.len()];
            }
            for (s, v) in r.sums.iter_mut().zip(values) {
                *s += v * batches as f64;
            }
            r.count += batches as u64;
        }
    }

    /// The learning-rate multipliers to apply (tensors at 1 omitted).
    pub fn multipliers(&self) -> BTreeMap<String, f64> {
        self.tensors
            .iter()
            .filter(|(_, s)| s.multiplier != 1.0)
            .map(|(n, s)| (n.clone(), s.multiplier))
            .collect()
    }

    /// Runs one consolidation cycle at `step`.
    pub fn cycle(&mut self, step: u64, cfg: &DreamSection, routers: &[RouterPaths]) -> DreamReport {
        self.cycles += 1;
        let clamp = |m: f64| m.clamp(cfg.min_multiplier, cfg.max_multiplier);
        let (mut crystallized, mut dissolved, mut pruned) = (Vec::new(), Vec::new(), Vec::new());
        for (name, s) in &mut self.tensors {
            if s.steps < 2 {
                continue;
            }
            let correct = |n: u64| 1.0 - cfg.ema.powi(n.min(i32::MAX as u64) as i32);
            let mean = s.mean / correct(s.steps);
            let jitter = s.jitter / correct(s.steps - 1);
            if mean <= 0.0 {
                continue;
            }
            let cv = jitter / mean;
            if cv < cfg.crystallize_below {
                s.multiplier = clamp(s.multiplier * cfg.crystallize_factor);
                crystallized.push(name.clone());
            } else if cv > cfg.dissolve_above {
                s.multiplier = clamp(s.multiplier * cfg.dissolve_factor);
                dissolved.push(name.clone());
            }
        }
        let mut report_routers = BTreeMap::new();
        for r in routers {
            let Some(sums) = self.routers.get(&r.stat).filter(|s| s.count > 0) else {
                continue;
            };
            let mean: Vec<f64> = sums.sums.iter().map(|s| s / sums.count as f64).collect();
            let paths = r.paths.len();
            let usage = mean[..paths.min(mean.len())].to_vec();
            let fair = r.top_k as f64 / paths as f64;
            for (path, u) in r.paths.iter().zip(&usage) {
                if *u < cfg.prune_below * fair {
                    pruned.push(path.clone());
                    let prefix = format!("{path}.");
                    for (name, s) in &mut self.tensors {
                        if name.starts_with(&prefix) {
                            s.multiplier = clamp(s.multiplier * cfg.prune_factor);
                        }
                    }
                }
            }
            report_routers.insert(
                r.stat.clone(),
                RouterReport {
                    usage,
                    confidence: mean.get(paths).copied().unwrap_or(f64::NAN),
                },
            );
        }
        self.routers.clear();
        let all: Vec<f64> = self.tensors.values().map(|s| s.multiplier).collect();
        let n = all.len().max(1) as f64;
        DreamReport {
            step,
            cycle: self.cycles,
            crystallized,
            dissolved,
            pruned,
            routers: report_routers,
            multiplier_min: all.iter().copied().fold(f64::INFINITY, f64::min).min(1.0),
            multiplier_mean: if all.is_empty() {
                1.0
            } else {
                all.iter().sum::<f64>() / n
            },
            multiplier_max: all
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max)
                .max(1.0),
            multipliers: self.multipliers(),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    fn cfg() -> DreamSection {
        toml::from_str("every = 3").expect("dream section")
    }

    fn grads(values: &[(&str, f32)]) -> BTreeMap<String, Tensor<Flex, 1>> {
        values
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    Tensor::from_data(TensorData::new(vec![*v; 4], [4]), &Default::default()),
                )
            })
            .collect()
    }

    #[test]
    fn steady_tensors_crystallize_and_swinging_ones_dissolve() {
        let c = cfg();
        let mut d = Dream::default();
        for step in 0..6 {
            let swing = if step % 2 == 0 { 0.1 } else { 2.0 };
            // A smooth decline is settling, not oscillating.
            let declining = 1.0 - 0.01 * step as f32;
            d.observe(
                &grads(&[
                    ("steady", 1.0),
                    ("swinging", swing),
                    ("declining", declining),
                ]),
                c.ema,
            )
            .expect("the gradients read back");
        }
        let report = d.cycle(6, &c, &[]);
        assert_eq!(
            report.crystallized,
            vec!["declining".to_string(), "steady".to_string()]
        );
        assert_eq!(report.dissolved, vec!["swinging".to_string()]);
        let m = d.multipliers();
        assert!((m["steady"] - c.crystallize_factor).abs() < 1e-12);
        assert!((m["swinging"] - c.dissolve_factor).abs() < 1e-12);
    }

    #[test]
    fn unused_router_paths_are_pruned_and_multipliers_stay_bounded() {
        let c = cfg();
        let mut d = Dream::default();
        d.observe(
            &grads(&[
                ("b.moa.conv.weight", 1.0),
                ("b.moa.attn.q_proj.weight", 1.0),
            ]),
            c.ema,
        )
        .expect("the gradients read back");
        let routers = [RouterPaths {
            stat: "b.moa.router".to_string(),
            paths: vec!["b.moa.conv".into(), "b.moa.attn".into()],
            top_k: 1,
        }];
        for cycle in 0..100 {
            // The conv path is never kept; attention always.
            d.observe_routers(&[("b.moa.router".to_string(), vec![0.0, 1.0, 0.9])]);
            let r = d.cycle(cycle, &c, &routers);
            assert_eq!(r.pruned, vec!["b.moa.conv".to_string()]);
            assert_eq!(r.routers["b.moa.router"].usage, vec![0.0, 1.0]);
        }
        let m = d.multipliers();
        assert_eq!(m["b.moa.conv.weight"], c.min_multiplier);
        assert!(!m.contains_key("b.moa.attn.q_proj.weight"));
    }
}
