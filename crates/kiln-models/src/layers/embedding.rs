//! The token embedding every family starts with, and NEFTune's training noise on it.

use burn::module::{Module, Param};
use burn::prelude::*;

use crate::KilnBackend;
use crate::init::Init;

/// Token embedding `[vocab, hidden]` (checkpoint key `<prefix>.embed_tokens.weight`), with
/// NEFTune noise on its output while gradients are tracked. A tied output head reads the
/// same `weight` ([`crate::layers::lm_head`]).
#[derive(Module, Debug)]
pub struct TokenEmbedding<B: KilnBackend> {
    /// `[vocab, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
    /// NEFTune noise scale (0: off); applied only when gradients are tracked (training).
    #[module(skip)]
    pub neftune_alpha: f64,
}

impl<B: KilnBackend> TokenEmbedding<B> {
    /// An embedding named `name` (`model.embed_tokens.weight`), drawn normal with `std`.
    pub fn new(
        init: &Init,
        name: &str,
        [vocab, hidden]: [usize; 2],
        std: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: init.normal(name, [vocab, hidden], std, device),
            neftune_alpha: 0.0,
        }
    }

    /// The embeddings of `input_ids` without noise (decoding).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn lookup(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), input_ids)
    }

    /// The embeddings of `input_ids`, with NEFTune noise while gradients are tracked.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        neftune(self.lookup(input_ids), self.neftune_alpha)
    }

    /// Whether the embedding is trained (false under adapters).
    pub fn trains(&self) -> bool {
        self.weight.is_require_grad()
    }
}

/// NEFTune (Jain et al. 2023): uniform noise of magnitude `alpha / sqrt(L * d)` on the input
/// embeddings, in training only (never in eval or generation, which run without autodiff).
///
/// # Shapes
/// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
fn neftune<B: Backend>(x: Tensor<B, 3>, alpha: f64) -> Tensor<B, 3> {
    let device = x.device();
    if alpha <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    let [_, t, d] = x.dims();
    let m = alpha / ((t * d) as f64).sqrt();
    let noise = Tensor::random(
        x.shape(),
        burn::tensor::Distribution::Uniform(-m, m),
        &device,
    );
    x + noise
}
