//! Forward + backward throughput of one MoA block against a dense Qwen2 decoder layer of the
//! same width and the same parameter count (its MLP widened to match), on the CPU (flex),
//! measured side by side in one process:
//!
//!     cargo run --release --example moa_block_bench                  # DiscoverLM-70M's block, 8 x 256
//!     cargo run --release --example moa_block_bench -- 512 8 1792 8 256 10
//!
//! Arguments: hidden, heads, MoA SwiGLU width, batch, sequence, timed iterations. Each
//! iteration runs the block forward on `[batch, seq, hidden]` inputs, adds its auxiliary
//! losses, and backpropagates a fixed upstream gradient, as a training step does.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

use kiln_models::{Aux, FamilyConfig, Init, KilnAutodiffBackend, MoaConfig, Model, Qwen2Config};

type B = Autodiff<Flex>;

/// Seconds per iteration of `model.layers(..).layer(0, ..)` forward + backward, after a warmup.
fn time_layer<A: KilnAutodiffBackend>(
    model: &Model<A>,
    batch: usize,
    seq: usize,
    hidden: usize,
    iters: usize,
) -> f64 {
    let device = Default::default();
    let ids = Tensor::<A, 2, Int>::zeros([batch, seq], &device);
    let layers = model.layers(&ids);
    let x = Tensor::<A, 3>::random(
        [batch, seq, hidden],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let up = Tensor::<A, 3>::random(
        [batch, seq, hidden],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let step = || {
        let x = x.clone().require_grad();
        let mut aux = Aux::default();
        let y = layers.layer(0, x.clone(), &mut aux);
        let mut loss = (y * up.clone()).sum();
        for (_, a) in aux.losses {
            loss = loss + a;
        }
        let grads = loss.backward();
        // Reading a gradient back waits for the work to finish.
        let g = x.grad(&grads).expect("input gradient");
        let _ = g.sum().into_scalar();
    };
    step();
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    start.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (hidden, heads, inter) = (arg(0, 512), arg(1, 8), arg(2, 1792));
    let (batch, seq, iters) = (arg(3, 8), arg(4, 256), arg(5, 5));
    let device = Default::default();

    let section: kiln_recipe::MoaSection = toml::from_str(&format!(
        "vocab_size = 260\nhidden_size = {hidden}\nnum_layers = 1\nnum_heads = {heads}\nintermediate_size = {inter}\nmax_position_embeddings = {}",
        seq.max(2048)
    ))
    .expect("moa section");
    let moa_cfg = MoaConfig::from_section(&section);
    let per_block = moa_cfg.num_params() - (moa_cfg.vocab_size * hidden + hidden) as u64;
    // Qwen2 layer: q, o [d, d] and k, v [d, d/4] with biases on q, k, v (GQA 4:1), two norms,
    // and a SwiGLU MLP of 3 * d * i: widen the MLP until the layer matches the MoA block.
    let kv = heads.div_ceil(4).max(1);
    let head_dim = hidden / heads;
    let attn = (2 * hidden * hidden
        + 2 * hidden * kv * head_dim
        + hidden
        + 2 * kv * head_dim
        + 2 * hidden) as u64;
    let q_inter = ((per_block.saturating_sub(attn)) / (3 * hidden as u64)) as usize;
    let qwen_cfg = Qwen2Config {
        vocab_size: 260,
        hidden_size: hidden,
        intermediate_size: q_inter,
        num_hidden_layers: 1,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        max_position_embeddings: seq.max(2048),
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        initializer_range: 0.02,
    };
    let qwen_block = qwen_cfg.num_params() - (260 * hidden + hidden) as u64;

    let moa = Model::Moa(moa_cfg.init::<B>(&Init::new(1), &device));
    let qwen = Model::Qwen2(qwen_cfg.init::<B>(&Init::new(1), &device));
    let tokens = (batch * seq) as f64;
    let moa_s = time_layer(&moa, batch, seq, hidden, iters);
    let qwen_s = time_layer(&qwen, batch, seq, hidden, iters);
    let gflops = |flops_per_token: f64, s: f64| flops_per_token * tokens / s / 1e9;
    // FLOPs of one layer: the model's estimate minus its head, over one layer.
    let moa_flops = moa_cfg.flops_per_token(seq) - 6.0 * (260 * hidden) as f64;
    let qwen_flops = qwen_cfg.flops_per_token(seq) - 6.0 * (260 * hidden) as f64;
    println!(
        "block forward+backward, batch {batch} x seq {seq}, hidden {hidden}, {heads} heads, {iters} iterations (flex, f32)"
    );
    println!(
        "  moa   {:>6.2}M params | {:>8.0} tokens/s | {:>7.1} ms/iter | {:>6.1} GFLOP/s (all four paths and three experts computed)",
        per_block as f64 / 1e6,
        tokens / moa_s,
        moa_s * 1e3,
        gflops(moa_flops, moa_s)
    );
    println!(
        "  qwen2 {:>6.2}M params | {:>8.0} tokens/s | {:>7.1} ms/iter | {:>6.1} GFLOP/s (intermediate {q_inter}, {kv} kv heads)",
        qwen_block as f64 / 1e6,
        tokens / qwen_s,
        qwen_s * 1e3,
        gflops(qwen_flops, qwen_s)
    );
    println!(
        "  moa / qwen2: {:.2}x tokens/s, {:.2}x GFLOP/s",
        qwen_s / moa_s,
        gflops(moa_flops, moa_s) / gflops(qwen_flops, qwen_s)
    );
}
