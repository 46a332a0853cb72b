//! Learning rate against the optimizer step.

use kiln_recipe::{Recipe, ScheduleKind};

/// The schedule of a recipe: warmup, then constant, linear or cosine decay to `min_lr`,
/// multiplied by the current phase's `lr_scale`.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: ScheduleKind,
    peak: f64,
    min_lr: f64,
    warmup: u64,
    total: u64,
}

impl Schedule {
    /// The schedule of `recipe` over all its phases.
    pub fn new(recipe: &Recipe) -> Self {
        Self {
            kind: recipe.schedule.kind,
            peak: recipe.optim.lr,
            min_lr: recipe.schedule.min_lr,
            warmup: recipe.schedule.warmup_steps,
            total: recipe.total_steps(),
        }
    }

    /// Learning rate of optimizer step `step` (1-based: the first update is step 1).
    pub fn lr(&self, step: u64, lr_scale: f64) -> f64 {
        let base = if self.warmup > 0 && step <= self.warmup {
            self.peak * step as f64 / self.warmup as f64
        } else {
            let span = self.total.saturating_sub(self.warmup).max(1) as f64;
            let progress = ((step.saturating_sub(self.warmup)) as f64 / span).clamp(0.0, 1.0);
            match self.kind {
                ScheduleKind::Constant => self.peak,
                ScheduleKind::Linear => self.min_lr + (self.peak - self.min_lr) * (1.0 - progress),
                ScheduleKind::Cosine => {
                    self.min_lr
                        + (self.peak - self.min_lr)
                            * 0.5
                            * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        };
        base * lr_scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak: 1.0,
            min_lr: 0.1,
            warmup: 10,
            total: 110,
        }
    }

    #[test]
    fn warmup_then_cosine_reaches_min_at_the_end() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr(1, 1.0) - 0.1).abs() < 1e-12);
        assert!((s.lr(10, 1.0) - 1.0).abs() < 1e-12);
        assert!(
            (s.lr(60, 1.0) - 0.55).abs() < 1e-12,
            "halfway is the midpoint"
        );
        assert!((s.lr(110, 1.0) - 0.1).abs() < 1e-12);
        assert!(
            (s.lr(60, 0.5) - 0.275).abs() < 1e-12,
            "phase scale multiplies"
        );
    }

    #[test]
    fn linear_and_constant() {
        assert!((schedule(ScheduleKind::Linear).lr(60, 1.0) - 0.55).abs() < 1e-12);
        assert!((schedule(ScheduleKind::Constant).lr(100, 1.0) - 1.0).abs() < 1e-12);
    }
}
