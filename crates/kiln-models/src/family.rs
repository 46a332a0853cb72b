//! The model-family trait: what a family is to the rest of kiln.
//!
//! A family ([`Family`]) has a resolved configuration ([`FamilyConfig`]: sizes and FLOPs,
//! no weights), a token embedding, `num_layers` layers that share a per-pass context and
//! report auxiliary losses and statistics into an [`Aux`] sink, a head, and the names of
//! the projections an adapter may target. Everything else — the embed → layers → head loop,
//! adapters, NEFTune, padding, decoding — is written once against this trait.
//!
//! [`crate::Model`] stays an enum over the families, because it must be one Burn
//! [`burn::module::Module`] type for the trainer (which is monomorphized per backend, not
//! per family), and Burn's `Module` is not object safe. The enum dispatches in exactly one
//! place: `Model::family` (and its `&mut` twin) returns a `&dyn` [`AnyFamily`], the
//! object-safe face of [`Family`] that a blanket impl gives every family. The per-pass
//! context is an associated type ([`Family::Context`]); it never leaves the family: it is
//! bound to the model that made it inside a [`Layers`] value, so no caller can hand one
//! family's context to another's layer.

use burn::prelude::*;

use crate::layers::TokenEmbedding;
use crate::lora::Proj;
use crate::{Aux, KilnBackend, ModelError, NamedTensor, RouterPaths};

/// Size and cost facts of a resolved family configuration, without weights.
pub trait FamilyConfig: std::fmt::Debug {
    /// Vocabulary size.
    fn vocab_size(&self) -> usize;

    /// Number of parameters.
    fn num_params(&self) -> u64;

    /// Parameters that enter matrix products per token.
    fn matmul_params(&self) -> u64;

    /// Training (forward + backward) FLOPs per token at sequence length `seq`.
    fn flops_per_token(&self, seq: usize) -> f64;

    /// Rough activation bytes per token kept for backward; with `checkpointed`, one
    /// layer's plus every layer's input.
    fn activation_bytes_per_token(&self, seq: usize, checkpointed: bool) -> u64;

    /// The `[in, out]` of every projection an adapter can target, by module name
    /// (`q_proj`, ...), one entry per layer; empty for a family without adapters.
    fn projections(&self) -> Vec<(&'static str, [usize; 2])> {
        Vec::new()
    }
}

/// How a family's tensors map to a Hugging Face checkpoint (names and layouts) and its
/// configuration to `config.json`.
pub trait HfFormat {
    /// Maps a Hugging Face tensor to kiln's name and layout; `None` drops it (a tied
    /// head's copy of the embedding).
    fn import_tensor(&self, name: String, t: NamedTensor) -> Option<(String, NamedTensor)>;

    /// The inverse of [`HfFormat::import_tensor`].
    fn export_tensor(&self, name: String, t: NamedTensor) -> (String, NamedTensor);

    /// The `config.json` that `transformers` reads back as this configuration.
    fn config_json(&self) -> serde_json::Value;
}

/// One model family: see the module docs. Parameter names are checkpoint keys, so a family
/// names its fields as its checkpoints do.
pub trait Family<B: KilnBackend> {
    /// The family's name in recipes (`model.family`) and messages.
    const NAME: &'static str;

    /// The resolved configuration.
    type Config: FamilyConfig;

    /// What the layers of one forward pass share (position tables, masks).
    type Context: 'static;

    /// The configuration the model was built from.
    fn config(&self) -> &Self::Config;

    /// The token embedding.
    fn embedding(&self) -> &TokenEmbedding<B>;

    /// The token embedding, to set its NEFTune scale.
    fn embedding_mut(&mut self) -> &mut TokenEmbedding<B>;

    /// The context of a forward pass over `input_ids` without padding.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]`
    fn context(&self, input_ids: &Tensor<B, 2, Int>) -> Self::Context;

    /// The context of a forward pass whose `padding` keys (true) must not be seen.
    ///
    /// The default serves causal families without an attention bias: right padding never
    /// reaches a real token (every layer reads only earlier positions), so the plain
    /// context is exact for the real tokens; any other padding is refused, because the
    /// family has no way to mask it.
    ///
    /// # Shapes
    /// - input_ids, padding: `[batch, seq]`
    fn masked_context(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        padding: Tensor<B, 2, Bool>,
    ) -> Result<Self::Context, ModelError> {
        require_right_padding(padding, Self::NAME)?;
        Ok(self.context(input_ids))
    }

    /// Number of layers.
    fn num_layers(&self) -> usize;

    /// Layer `i`; its auxiliary losses and statistics go to `aux`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    fn layer(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        ctx: &Self::Context,
        aux: &mut Aux<B>,
    ) -> Tensor<B, 3>;

    /// From the last layer's output to logits.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;

    /// The projections an adapter may target, by module name
    /// (`model.layers.0.self_attn.q_proj`), in layer order.
    fn projections(&self) -> Vec<(String, &Proj<B>)> {
        Vec::new()
    }

    /// [`Family::projections`], mutable.
    fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        Vec::new()
    }

    /// The routers and the parameters of their paths (none without routing).
    fn routers(&self) -> Vec<RouterPaths> {
        Vec::new()
    }

    /// The family's Hugging Face format, if it has one.
    fn hf_format(&self) -> Option<&dyn HfFormat> {
        None
    }

    /// A decoding step for [`crate::generate()`]: logits of the new tokens given every
    /// earlier call's. The default has no cache: it keeps every token seen and runs the
    /// whole sequence again, keeping the new tokens' logits, which causality makes equal
    /// to a cached decode's.
    fn decoder<'a>(&'a self) -> Box<dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3> + 'a>
    where
        Self: Sized,
    {
        Box::new(crate::generate::recompute(move |ids| forward(self, ids).0))
    }
}

/// The accessors every family writes alike, inside its `impl Family<B>`: the
/// configuration in its `config` field and the token embedding at the given field path
/// (`embed_tokens`, `model.embed_tokens`).
macro_rules! config_and_embedding {
    ($($embedding:ident).+) => {
        fn config(&self) -> &Self::Config {
            &self.config
        }

        fn embedding(&self) -> &$crate::layers::TokenEmbedding<B> {
            &self.$($embedding).+
        }

        fn embedding_mut(&mut self) -> &mut $crate::layers::TokenEmbedding<B> {
            &mut self.$($embedding).+
        }
    };
}
pub(crate) use config_and_embedding;

/// Logits of `input_ids` through `layers` (made by `family` for them): the embedding,
/// every layer in order, the head; with what the layers reported.
///
/// # Shapes
/// - input_ids: `[batch, seq]` -> logits `[batch, seq, vocab]`
pub fn run<B: KilnBackend>(
    family: &dyn AnyFamily<B>,
    layers: &Layers<'_, B>,
    input_ids: Tensor<B, 2, Int>,
) -> (Tensor<B, 3>, Aux<B>) {
    let (x, aux) = layers.forward(family.embedding().forward(input_ids));
    (family.head(x), aux)
}

/// A whole forward pass of one family without padding: logits and what the layers
/// reported.
///
/// # Shapes
/// - input_ids: `[batch, seq]` -> logits `[batch, seq, vocab]`
pub fn forward<B: KilnBackend, F: Family<B>>(
    family: &F,
    input_ids: Tensor<B, 2, Int>,
) -> (Tensor<B, 3>, Aux<B>) {
    run(family, &AnyFamily::layers(family, &input_ids), input_ids)
}

/// Fails unless every row's padding (true) is a suffix: right padding only.
///
/// # Shapes
/// - padding: `[batch, seq]`
pub fn require_right_padding<B: Backend>(
    padding: Tensor<B, 2, Bool>,
    family: &'static str,
) -> Result<(), ModelError> {
    let [_, t] = padding.dims();
    let values = padding
        .into_data()
        .convert::<bool>()
        .into_vec::<bool>()
        .expect("a bool mask");
    for (row, r) in values.chunks(t.max(1)).enumerate() {
        if let Some(first) = r.iter().position(|&p| p)
            && r[first..].iter().any(|&p| !p)
        {
            return Err(ModelError::Padding { family, row });
        }
    }
    Ok(())
}

/// The layers of one forward pass, bound to the context they share: made by
/// [`crate::Model::layers`], so the context always belongs to the model that runs it.
pub struct Layers<'a, B: KilnBackend>(Box<dyn LayerPass<B> + 'a>);

impl<B: KilnBackend> Layers<'_, B> {
    /// Number of layers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `i`; its auxiliary losses and statistics go to `aux`.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn layer(&self, i: usize, x: Tensor<B, 3>, aux: &mut Aux<B>) -> Tensor<B, 3> {
        self.0.layer(i, x, aux)
    }

    /// Every layer in order: the last layer's output and what the layers reported.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward(&self, mut x: Tensor<B, 3>) -> (Tensor<B, 3>, Aux<B>) {
        let mut aux = Aux::default();
        for i in 0..self.len() {
            x = self.layer(i, x, &mut aux);
        }
        (x, aux)
    }
}

/// A family with its context, behind [`Layers`].
trait LayerPass<B: KilnBackend> {
    fn len(&self) -> usize;
    fn layer(&self, i: usize, x: Tensor<B, 3>, aux: &mut Aux<B>) -> Tensor<B, 3>;
}

struct Bound<'a, B: KilnBackend, F: Family<B>> {
    family: &'a F,
    ctx: F::Context,
    _backend: std::marker::PhantomData<fn() -> B>,
}

impl<B: KilnBackend, F: Family<B>> LayerPass<B> for Bound<'_, B, F> {
    fn len(&self) -> usize {
        self.family.num_layers()
    }

    fn layer(&self, i: usize, x: Tensor<B, 3>, aux: &mut Aux<B>) -> Tensor<B, 3> {
        self.family.layer(i, x, &self.ctx, aux)
    }
}

/// The object-safe face of [`Family`], which every family has through a blanket impl:
/// what [`crate::Model`] forwards to.
pub trait AnyFamily<B: KilnBackend> {
    /// [`Family::NAME`].
    fn name(&self) -> &'static str;
    /// [`Family::config`].
    fn config(&self) -> &dyn FamilyConfig;
    /// [`Family::embedding`].
    fn embedding(&self) -> &TokenEmbedding<B>;
    /// [`Family::embedding_mut`].
    fn embedding_mut(&mut self) -> &mut TokenEmbedding<B>;
    /// [`Family::num_layers`].
    fn num_layers(&self) -> usize;
    /// The layers of a pass over `input_ids`, bound to their context.
    fn layers(&self, input_ids: &Tensor<B, 2, Int>) -> Layers<'_, B>;
    /// [`AnyFamily::layers`] with padding keys masked ([`Family::masked_context`]).
    fn masked_layers(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        padding: Tensor<B, 2, Bool>,
    ) -> Result<Layers<'_, B>, ModelError>;
    /// [`Family::head`].
    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;
    /// [`Family::projections`].
    fn projections(&self) -> Vec<(String, &Proj<B>)>;
    /// [`Family::projections_mut`].
    fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)>;
    /// [`Family::routers`].
    fn routers(&self) -> Vec<RouterPaths>;
    /// [`Family::hf_format`].
    fn hf_format(&self) -> Option<&dyn HfFormat>;
    /// [`Family::decoder`].
    fn decoder(&self) -> Box<dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3> + '_>;
}

impl<B: KilnBackend, F: Family<B>> AnyFamily<B> for F {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn config(&self) -> &dyn FamilyConfig {
        Family::config(self)
    }

    fn embedding(&self) -> &TokenEmbedding<B> {
        Family::embedding(self)
    }

    fn embedding_mut(&mut self) -> &mut TokenEmbedding<B> {
        Family::embedding_mut(self)
    }

    fn num_layers(&self) -> usize {
        Family::num_layers(self)
    }

    fn layers(&self, input_ids: &Tensor<B, 2, Int>) -> Layers<'_, B> {
        Layers(Box::new(Bound {
            family: self,
            ctx: self.context(input_ids),
            _backend: std::marker::PhantomData,
        }))
    }

    fn masked_layers(
        &self,
        input_ids: &Tensor<B, 2, Int>,
        padding: Tensor<B, 2, Bool>,
    ) -> Result<Layers<'_, B>, ModelError> {
        Ok(Layers(Box::new(Bound {
            family: self,
            ctx: self.masked_context(input_ids, padding)?,
            _backend: std::marker::PhantomData,
        })))
    }

    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        Family::head(self, x)
    }

    fn projections(&self) -> Vec<(String, &Proj<B>)> {
        Family::projections(self)
    }

    fn projections_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        Family::projections_mut(self)
    }

    fn routers(&self) -> Vec<RouterPaths> {
        Family::routers(self)
    }

    fn hf_format(&self) -> Option<&dyn HfFormat> {
        Family::hf_format(self)
    }

    fn decoder(&self) -> Box<dyn FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3> + '_> {
        Family::decoder(self)
    }
}
