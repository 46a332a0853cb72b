//! What the profiling examples share.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

/// The backend the examples profile.
pub type B = Autodiff<Flex>;

/// Median forward and backward milliseconds of `op` over `iters` runs (after one warmup).
pub fn time(iters: usize, op: &dyn Fn() -> Tensor<B, 1>) -> (f64, f64) {
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let out = op();
        let t1 = Instant::now();
        let _ = out.backward();
        let t2 = Instant::now();
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut fwd), median(&mut bwd))
}
