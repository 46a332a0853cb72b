//! The SwiGLU feed-forward block (Shazeer 2020), `down(silu(x gate) * x up)`: Qwen2's MLP,
//! MoA's SwiGLU expert and ConvGPT's MLP.

use burn::module::Module;
use burn::prelude::*;

use crate::KilnBackend;
use crate::init::Init;
use crate::lora::Proj;

/// SwiGLU with projections named as Hugging Face names them (`gate_proj`, `up_proj`,
/// `down_proj`), each a [`Proj`] so that adapters can target them.
#[derive(Module, Debug)]
pub struct SwiGlu<B: KilnBackend> {
    /// `[hidden, intermediate]`.
    pub gate_proj: Proj<B>,
    /// `[hidden, intermediate]`.
    pub up_proj: Proj<B>,
    /// `[intermediate, hidden]`.
    pub down_proj: Proj<B>,
}

impl<B: KilnBackend> SwiGlu<B> {
    /// A block named `prefix` (`model.layers.0.mlp`), bias-free, weights normal with `std`.
    pub fn new(
        init: &Init,
        prefix: &str,
        [hidden, intermediate]: [usize; 2],
        std: f64,
        device: &B::Device,
    ) -> Self {
        let lin = |name: &str, i, o| {
            init.linear(&format!("{prefix}.{name}"), i, o, false, std, device)
                .into()
        };
        Self {
            gate_proj: lin("gate_proj", hidden, intermediate),
            up_proj: lin("up_proj", hidden, intermediate),
            down_proj: lin("down_proj", intermediate, hidden),
        }
    }

    /// The gate and up projections, then [`crate::ops::swiglu`] (one backend op), then down.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone()); // [b, t, intermediate]
        self.down_proj
            .forward(crate::ops::swiglu(gate, self.up_proj.forward(x)))
    }
}
