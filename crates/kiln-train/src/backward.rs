//! One micro-batch's forward and backward pass, in the memory strategy the recipe picks.
//!
//! Every strategy is a [`Backward`] component: it runs one micro-batch forward, adds the
//! gradients of its loss to a [`GradAccumulator`], and reports the loss, the auxiliary
//! losses and the layers' statistics. The training step holds one, chosen once per run by
//! [`for_recipe`], and never asks which:
//!
//! - [`Plain`]: the whole model and its loss in one graph, one backward pass.
//! - [`HeadChunked`] (`train.head_chunk_tokens`): the layers in one graph, the head and its
//!   cross-entropy a chunk of tokens at a time ([`Head`]), each chunk's backward before the
//!   next; the layers' backward starts from the gathered gradient of their output.
//! - [`Checkpointed`] (`train.activation_checkpointing`): the forward pass keeps only each
//!   layer's input, the backward pass recomputes one layer at a time; its head is a
//!   [`Head`] too, whole or in chunks.
//!
//! Evaluation ([`per_token_nll`]) goes through the same [`Head`] when the head is chunked.
//! The strategies give the same loss and gradients up to summation order; the tests below
//! check that on tiny models.

use burn::prelude::*;

use kiln_data::Batch;
use kiln_models::{Aux, KilnAutodiffBackend, KilnBackend, Model};
use kiln_recipe::TrainSection;

use crate::TrainError;
use crate::loss::{input_tensor, masked_nll, masked_nll_rows};
use crate::optim::GradAccumulator;

/// Named host vectors: auxiliary losses or statistics, as read back from the device.
pub type Named = Vec<(String, Vec<f32>)>;

/// How a micro-batch's losses are scaled within its optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Trained target tokens of the whole step: the language-model loss is divided by it.
    pub denom: f64,
    /// Micro-batches of the step (over all processes): each auxiliary loss is divided by
    /// it, so that the step reports their mean.
    pub accum: f64,
}

/// What one micro-batch's pass reports; its gradients went to the accumulator.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroStep {
    /// The micro-batch's share of the step's loss, auxiliary losses included.
    pub loss: f64,
    /// The auxiliary losses, each divided by [`Scale::accum`].
    pub aux_losses: Named,
    /// The layers' statistics (router usage).
    pub stats: Named,
}

/// One micro-batch and where its gradients go: what every strategy is given.
pub struct MicroBatch<'p, B: KilnAutodiffBackend> {
    /// The model being trained.
    pub model: &'p Model<B>,
    /// The micro-batch.
    pub batch: &'p Batch,
    /// How its losses are scaled.
    pub scale: Scale,
    /// The micro-batch's own seed, for strategies that must draw the same random values
    /// twice.
    pub seed: u64,
    /// The training device.
    pub device: &'p B::Device,
    /// The step's summed gradients, which the pass adds to.
    pub acc: &'p mut GradAccumulator<B::InnerBackend>,
}

/// One micro-batch's forward and backward pass.
pub trait Backward<B: KilnAutodiffBackend> {
    /// Runs the micro-batch through the model, adds the gradients of its scaled loss to
    /// the accumulator and reports the loss.
    fn run(&self, mb: MicroBatch<'_, B>) -> Result<MicroStep, TrainError>;
}

/// The strategy a recipe's `[train]` section asks for.
pub fn for_recipe<B: KilnAutodiffBackend>(train: &TrainSection) -> Box<dyn Backward<B>> {
    let head = Head::new(train.head_chunk_tokens);
    if train.activation_checkpointing {
        Box::new(Checkpointed { head })
    } else if train.head_chunk_tokens.is_some() {
        Box::new(HeadChunked { head })
    } else {
        Box::new(Plain)
    }
}

/// The whole forward pass and its loss in one graph, and one backward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl<B: KilnAutodiffBackend> Backward<B> for Plain {
    fn run(&self, mb: MicroBatch<'_, B>) -> Result<MicroStep, TrainError> {
        let out = mb.model.forward(input_tensor::<B>(mb.batch, mb.device));
        let (nll, _) = masked_nll(out.logits, mb.batch, mb.device);
        let mut aux_losses = Vec::new();
        let loss = nll.div_scalar(mb.scale.denom);
        let loss = with_aux(loss, out.aux_losses, mb.scale.accum, &mut aux_losses);
        let aux_losses = read_named(aux_losses, "auxiliary losses")?;
        let stats = read_named(out.stats, "layer statistics")?;
        let value = scalar(loss.clone());
        mb.acc.accumulate::<B, _>(mb.model, loss.backward());
        Ok(MicroStep {
            loss: value,
            aux_losses,
            stats,
        })
    }
}

/// The layers in one graph, the head through [`Head`]: the layers' backward runs once,
/// from the gathered gradient of their output.
#[derive(Debug, Clone, Copy)]
pub struct HeadChunked {
    /// The head, applied a chunk of tokens at a time.
    pub head: Head,
}

impl<B: KilnAutodiffBackend> Backward<B> for HeadChunked {
    fn run(&self, mut mb: MicroBatch<'_, B>) -> Result<MicroStep, TrainError> {
        let (top, aux) = mb.model.hidden(input_tensor::<B>(mb.batch, mb.device));
        let (value, upstream) = self.head.backward(top.clone().detach(), &mut mb)?;
        let mut aux_losses = Vec::new();
        let objective = pullback(top, upstream);
        let objective = with_aux(objective, aux.losses, mb.scale.accum, &mut aux_losses);
        mb.acc.accumulate::<B, _>(mb.model, objective.backward());
        finish(value, aux_losses, aux.stats)
    }
}

/// Activation checkpointing: the forward pass keeps only each layer's input; the backward
/// pass recomputes one layer at a time and backpropagates through it alone (with the
/// layer's auxiliary losses), so activations of a single layer are alive at once. Each
/// layer reseeds the backend's generator before both of its passes, so its random ops
/// (dropout, DropPath, sampled triples) draw the same values in the recomputation.
#[derive(Debug, Clone, Copy)]
pub struct Checkpointed {
    /// The head, whole or a chunk of tokens at a time.
    pub head: Head,
}

impl<B: KilnAutodiffBackend> Backward<B> for Checkpointed {
    fn run(&self, mut mb: MicroBatch<'_, B>) -> Result<MicroStep, TrainError> {
        let ids = input_tensor::<B>(mb.batch, mb.device);
        let n = mb.model.num_layers();
        let seed = mb.seed;
        let layer_seed = |l: usize| seed ^ (l as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
        // The forward pass runs on a copy whose parameters track no gradients: nothing is
        // recorded, so no layer's activations outlive it (on the autodiff backend all the
        // same, so dropout and NEFTune act exactly as in the recomputation).
        let untracked = mb.model.clone().no_grad();
        let forward_layers = untracked.layers(&ids);
        let mut forward_aux = Aux::default();
        B::seed(mb.device, layer_seed(n));
        let mut inputs = vec![untracked.embed(ids.clone())];
        for l in 0..n {
            B::seed(mb.device, layer_seed(l));
            let y = forward_layers.layer(l, inputs[l].clone(), &mut forward_aux);
            inputs.push(y);
        }
        let top = inputs.pop().expect("the last layer's output");
        let (value, mut upstream) = self.head.backward(top, &mut mb)?;
        // The tracked model's layers, bound to a context of their own (the same host data).
        let layers = mb.model.layers(&ids);
        let mut aux_losses = Vec::new();
        for l in (0..n).rev() {
            B::seed(mb.device, layer_seed(l));
            let x = inputs.pop().expect("layer input").require_grad();
            let mut aux = Aux::default();
            let y = layers.layer(l, x.clone(), &mut aux);
            let objective = pullback(y, upstream);
            let objective = with_aux(objective, aux.losses, mb.scale.accum, &mut aux_losses);
            let grads = objective.backward();
            upstream = x.grad(&grads).expect("the layer's input gradient");
            mb.acc.accumulate::<B, _>(mb.model, grads);
        }
        if mb.model.embedding_trains() {
            let grads = pullback(mb.model.embed(ids), upstream).backward();
            mb.acc.accumulate::<B, _>(mb.model, grads);
        }
        finish(value, aux_losses, forward_aux.stats)
    }
}

/// The output head and its cross-entropy over the last layer's output, `rows` tokens at a
/// time (all of them at once without `rows`). Each chunk's `[tokens, vocab]` logits are
/// made, used and dropped before the next, so one chunk's logits are alive at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    rows: Option<usize>,
}

impl Head {
    /// A head applied `rows` tokens at a time, or to all tokens at once.
    pub fn new(rows: Option<usize>) -> Self {
        Self { rows }
    }

    /// The language-model loss of the head over `top` (the last layer's output of `mb`, a
    /// leaf of no graph) divided by the step's trained tokens, and that loss's gradient
    /// with respect to `top`; the head's parameter gradients go to the accumulator.
    ///
    /// # Shapes
    /// - top: `[batch, seq, hidden]`; returns the gradient in the same shape
    fn backward<B: KilnAutodiffBackend>(
        &self,
        top: Tensor<B, 3>,
        mb: &mut MicroBatch<'_, B>,
    ) -> Result<(f64, Tensor<B::InnerBackend, 3>), TrainError> {
        let dims = top.dims();
        let mut value = 0.0;
        let mut parts = Vec::new();
        for (range, x) in self.chunks(top) {
            let x = x.require_grad();
            let (nll, _) = chunk_nll(mb.model, x.clone(), mb.batch, range, mb.device);
            let loss = nll.div_scalar(mb.scale.denom);
            value += scalar(loss.clone());
            let grads = loss.backward();
            parts.push(x.grad(&grads).expect("the head's input gradient"));
            mb.acc.accumulate::<B, _>(mb.model, grads);
        }
        Ok((value, Tensor::cat(parts, 1).reshape(dims)))
    }

    /// The per-position losses of the head over `top` (0 where masked), without gradients.
    ///
    /// # Shapes
    /// - top: `[batch, seq, hidden]`; returns `[batch * seq]`
    fn per_token<B: KilnBackend>(
        &self,
        model: &Model<B>,
        top: Tensor<B, 3>,
        batch: &Batch,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let parts = self
            .chunks(top)
            .map(|(range, x)| chunk_nll(model, x, batch, range, device).1)
            .collect();
        Tensor::cat(parts, 0)
    }

    fn chunks<B: Backend>(&self, top: Tensor<B, 3>) -> HeadChunks<B> {
        let [b, t, _] = top.dims();
        HeadChunks::new(top, self.rows.unwrap_or(b * t))
    }
}

/// The per-position losses of `batch` under `model` (0 where masked), for evaluation: the
/// whole forward pass, or with `head_rows` the layers and then the training's [`Head`].
///
/// # Shapes
/// - returns `[batch * seq]`
pub fn per_token_nll<B: KilnBackend>(
    model: &Model<B>,
    batch: &Batch,
    head_rows: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 1> {
    let ids = input_tensor::<B>(batch, device);
    match head_rows {
        None => masked_nll(model.forward(ids).logits, batch, device).1,
        Some(rows) => {
            let (top, _) = model.hidden(ids);
            Head::new(Some(rows)).per_token(model, top, batch, device)
        }
    }
}

/// [`masked_nll_rows`] of the head over the positions `range` of `batch`, whose rows `x`
/// holds.
fn chunk_nll<B: KilnBackend>(
    model: &Model<B>,
    x: Tensor<B, 3>,
    batch: &Batch,
    range: std::ops::Range<usize>,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let (targets, mask) = (&batch.targets[range.clone()], &batch.mask[range]);
    masked_nll_rows(model.head(x), targets, mask, device)
}

/// The scalar whose gradient with respect to `y`'s graph is `upstream`: how a backward
/// pass continues from a gradient computed apart (the head's, or a later layer's).
fn pullback<B: KilnAutodiffBackend>(
    y: Tensor<B, 3>,
    upstream: Tensor<B::InnerBackend, 3>,
) -> Tensor<B, 1> {
    (y * Tensor::from_inner(upstream)).sum()
}

/// The report of a pass that summed its head's loss on the host: the auxiliary losses
/// are read back and added to it.
fn finish<B: Backend>(
    value: f64,
    aux_losses: Vec<(String, Tensor<B, 1>)>,
    stats: Vec<(String, Tensor<B, 1>)>,
) -> Result<MicroStep, TrainError> {
    let aux_losses = read_named(aux_losses, "auxiliary losses")?;
    let loss = value + named_sum(&aux_losses);
    let stats = read_named(stats, "layer statistics")?;
    Ok(MicroStep {
        loss,
        aux_losses,
        stats,
    })
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

/// The value of a one-element tensor.
fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    f64::from(t.into_scalar().elem::<f32>())
}

/// Reads named 1-D tensors back to the host in one transfer; `what` names them in the
/// error if the read fails.
fn read_named<B: Backend>(
    items: Vec<(String, Tensor<B, 1>)>,
    what: &str,
) -> Result<Named, TrainError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let (names, tensors): (Vec<String>, Vec<Tensor<B, 1>>) = items.into_iter().unzip();
    let lens: Vec<usize> = tensors.iter().map(|t| t.dims()[0]).collect();
    let values = crate::read_back(Tensor::cat(tensors, 0).into_data(), || {
        format!("{what} (`{}`)", names.join("`, `"))
    })?;
    let mut at = 0;
    Ok(names
        .into_iter()
        .zip(lens)
        .map(|(n, len)| {
            let v = values[at..at + len].to_vec();
            at += len;
            (n, v)
        })
        .collect())
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

#[cfg(test)]
mod tests {
    //! Every backward strategy against the plain pass on tiny models of each family, built
    //! from recipes written here (random init from the recipe's seed, no files read).

    use std::collections::BTreeMap;
    use std::path::Path;

    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::prelude::*;

    use kiln_data::Batch;
    use kiln_models::Model;

    use super::{
        Backward, Checkpointed, Head, HeadChunked, MicroBatch, MicroStep, Plain, Scale,
        per_token_nll,
    };
    use crate::optim::GradAccumulator;

    type B = Autodiff<Flex>;

    /// A recipe around one tiny model of `family` configured by `config` (one TOML line
    /// under `[model]`); nothing in it is read from disk.
    fn model(family: &str, config: &str) -> Model<B> {
        let text = format!(
            r#"
[run]
name = "tiny"
seed = 5

[model]
family = "{family}"
{config}

[tokenizer]
kind = "bytes"

[[data.sources]]
name = "none"
format = "text"
path = "nowhere"

[[phases]]
name = "only"
sources = {{ none = 1.0 }}
batch_size = 2
window = 32
steps = 1
"#
        );
        let table: toml::Table = text.parse().expect("the test recipe is TOML");
        let recipe = kiln_recipe::from_table(&table, Path::new("tiny.toml")).expect("a recipe");
        Model::for_training(&recipe, &Default::default()).expect("a tiny model")
    }

    const QWEN2: &str = "qwen2 = { vocab_size = 260, hidden_size = 32, \
        intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, \
        num_key_value_heads = 2, max_position_embeddings = 64, tie_word_embeddings = true }";

    const CONVGPT: &str = "convgpt = { vocab_size = 260, hidden_size = 32, num_layers = 2, \
        intermediate_size = 64, num_heads = 4, conv_kernel = 4, conv2d_kernel = 3, \
        grid_order = 4, memory_every = 2, memory_chunk = 8, memory_top_k = 2, \
        rope = \"alternate\", initializer_range = 0.05 }";

    /// MoA without its random terms (DropPath, the sampled triangle triples), which the
    /// plain pass and the layer-by-layer one draw from different generator states.
    const MOA: &str = "moa = { vocab_size = 260, hidden_size = 32, num_layers = 2, \
        num_heads = 4, intermediate_size = 64, conv_kernel = 4, max_position_embeddings = 64, \
        rope_fourier = 4, triangle_weight = 0.0, balance_weight = 0.01, drop_path = 0.0, \
        initializer_range = 0.05 }";

    /// Two rows of 32 positions with a few masked targets.
    fn batch() -> Batch {
        let n = 2 * 32;
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 256).collect();
        Batch {
            batch_size: 2,
            window: 32,
            inputs: ids.clone(),
            targets: ids.iter().map(|i| (i * 7 + 3) % 256).collect(),
            mask: (0..n).map(|i| if i % 5 == 2 { 0.0 } else { 1.0 }).collect(),
        }
    }

    fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// One strategy's report and gradients (by parameter name) on `batch`.
    fn run(
        strategy: &dyn Backward<B>,
        model: &Model<B>,
        batch: &Batch,
    ) -> (MicroStep, BTreeMap<String, Vec<f32>>) {
        let device = Default::default();
        let mut acc = GradAccumulator::default();
        let scale = Scale {
            denom: batch.trained_tokens() as f64,
            accum: 2.0,
        };
        <B as Backend>::seed(&device, 9);
        let report = strategy
            .run(MicroBatch {
                model,
                batch,
                scale,
                seed: 17,
                device: &device,
                acc: &mut acc,
            })
            .expect("the pass reads back");
        let grads = acc
            .take()
            .into_iter()
            .map(|(name, g)| (name, values(g)))
            .collect();
        (report, grads)
    }

    /// Named values summed by name, as the training step sums them (the layer-by-layer
    /// pass reports its layers' auxiliary losses last layer first).
    fn by_name(items: &[(String, Vec<f32>)]) -> BTreeMap<String, Vec<f32>> {
        let mut out: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for (name, v) in items {
            let sum = out
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; v.len()]);
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Every strategy (with head chunks that do not divide the batch's 64 tokens) gives the
    /// plain pass's loss, auxiliary losses, statistics and gradients; the two strategies
    /// that apply the head the same way agree exactly.
    fn check_family(family: &str, config: &str) {
        let model = model(family, config);
        let batch = batch();
        let head = Head::new(Some(5));
        let (plain, plain_grads) = run(&Plain, &model, &batch);
        assert!(plain.loss.is_finite() && plain.loss > 1.0, "{}", plain.loss);
        assert!(!plain_grads.is_empty());
        assert!(plain_grads.values().flatten().any(|g| *g != 0.0));
        let modes: [(&str, &dyn Backward<B>); 3] = [
            ("head chunks", &HeadChunked { head }),
            (
                "checkpointed",
                &Checkpointed {
                    head: Head::new(None),
                },
            ),
            ("checkpointed with head chunks", &Checkpointed { head }),
        ];
        let mut reports = Vec::new();
        for (name, mode) in modes {
            let (report, grads) = run(mode, &model, &batch);
            assert!(
                (report.loss - plain.loss).abs() <= 1e-5 * plain.loss.abs(),
                "{name}: loss {} against {}",
                report.loss,
                plain.loss
            );
            for (named, plain_named) in [
                (&report.aux_losses, &plain.aux_losses),
                (&report.stats, &plain.stats),
            ] {
                let (got, want) = (by_name(named), by_name(plain_named));
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>(),
                    "{name}"
                );
                for (n, v) in &got {
                    assert!(
                        max_diff(v, &want[n]) <= 1e-5,
                        "{name}: `{n}` {v:?} against {:?}",
                        want[n]
                    );
                }
            }
            assert_eq!(
                grads.keys().collect::<Vec<_>>(),
                plain_grads.keys().collect::<Vec<_>>(),
                "{name}"
            );
            for (param, g) in &grads {
                let want = &plain_grads[param];
                let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                let diff = max_diff(g, want);
                assert!(
                    diff <= 1e-4 * scale,
                    "{name}: gradient of `{param}` differs by {diff} (largest {scale})"
                );
            }
            reports.push((report, grads));
        }
        // The head in chunks with the layers in one graph, and the same head over layers
        // recomputed one at a time: the same operations in the same order.
        let (chunked, chunked_grads) = &reports[0];
        let (both, both_grads) = &reports[2];
        assert_eq!(chunked.loss, both.loss);
        assert_eq!(chunked_grads, both_grads);
    }

    #[test]
    fn every_backward_mode_gives_the_plain_loss_and_gradients_on_qwen2() {
        check_family("qwen2", QWEN2);
    }

    #[test]
    fn every_backward_mode_gives_the_plain_loss_and_gradients_on_convgpt() {
        check_family("convgpt", CONVGPT);
    }

    #[test]
    fn every_backward_mode_gives_the_plain_loss_and_gradients_on_moa() {
        check_family("moa", MOA);
    }

    /// Evaluation through the chunked head scores every position as the whole forward pass
    /// does (0 at masked ones), and its masked sum is the training loss.
    #[test]
    fn evaluation_in_head_chunks_gives_the_whole_forward_losses() {
        let model = model("qwen2", QWEN2).valid();
        let batch = batch();
        let device = Default::default();
        let whole = values(per_token_nll(&model, &batch, None, &device));
        let chunked = values(per_token_nll(&model, &batch, Some(5), &device));
        assert_eq!(whole.len(), 64);
        assert!(
            max_diff(&whole, &chunked) <= 1e-5,
            "{whole:?} against {chunked:?}"
        );
        for (loss, mask) in chunked.iter().zip(&batch.mask) {
            assert_eq!(*mask == 0.0, *loss == 0.0);
        }
        let (plain, _) = run(&Plain, &self::model("qwen2", QWEN2), &batch);
        let mean =
            chunked.iter().map(|x| f64::from(*x)).sum::<f64>() / batch.trained_tokens() as f64;
        assert!(
            (mean - plain.loss).abs() <= 1e-5 * plain.loss,
            "{mean} against {}",
            plain.loss
        );
    }
}
