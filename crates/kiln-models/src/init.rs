//! Deterministic, backend-independent weight initialization.
//!
//! Every tensor is drawn on the host from a generator seeded by the run seed and the
//! tensor's checkpoint name, so a model initializes identically on every backend and
//! independently of the order in which modules are built.

use burn::module::{Param, ParamId};
use burn::nn::Linear;
use burn::prelude::*;
use kiln_recipe::rng::SplitMix64;

use crate::parallel::concat_parallel;

/// Seeded initializer.
#[derive(Debug, Clone, Copy)]
pub struct Init {
    seed: u64,
}

impl Init {
    /// An initializer for a run seed.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    fn rng(&self, name: &str) -> SplitMix64 {
        // FNV-1a of the name, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = SplitMix64::new(self.seed ^ h);
        rng.next_u64();
        rng
    }

    /// A `N(0, std)` parameter named `name`, drawn lazily: a weight that is loaded from
    /// a checkpoint (or quantized) before its first use is never drawn or allocated.
    pub fn normal<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        std: f64,
        device: &B::Device,
    ) -> Param<Tensor<B, D>> {
        let this = *self;
        let name = name.to_string();
        Param::uninitialized(
            ParamId::new(),
            move |device, require_grad| {
                let n: usize = shape.iter().product();
                let rng = this.rng(&name);
                // Each sample takes two draws, so any piece of the stream can start on its
                // own: the same values as one pass, on every core (a 7B model is 7.6 billion).
                let values = concat_parallel(n, 1, |range| {
                    let mut rng = rng.advanced(2 * range.start as u64);
                    range.map(|_| (rng.next_normal() * std) as f32).collect()
                });
                Tensor::from_data(TensorData::new(values, shape), device)
                    .set_require_grad(require_grad)
            },
            device.clone(),
            true,
            shape.into(),
        )
    }

    /// A `U(-bound, bound)` tensor named `name`.
    pub fn uniform<B: Backend, const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        bound: f64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let mut rng = self.rng(name);
        let values: Vec<f32> = (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// A linear layer `[d_in, d_out]` named `prefix` (`prefix.weight`, `prefix.bias`):
    /// normal weights, zero bias, as Hugging Face's `_init_weights`.
    pub fn linear<B: Backend>(
        &self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
        device: &B::Device,
    ) -> Linear<B> {
        Linear {
            weight: self.normal(&format!("{prefix}.weight"), [d_in, d_out], std, device),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
        }
    }
}
