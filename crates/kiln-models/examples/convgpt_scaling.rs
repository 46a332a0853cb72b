//! How ConvGPT-v2 and a same-size Qwen2 scale with the sequence: forward + backward
//! tokens/s of whole models at T = 512, 1024 and 2048 (4096 tokens per iteration, so the
//! batch halves as T doubles), on the CPU (flex, f32), measured side by side in one process:
//!
//!     cargo run --release --example convgpt_scaling
//!     cargo run --release --example convgpt_scaling -- 256 4 3 2 # hidden, layers, iterations, memory_every
//!
//! The ConvGPT model has memory on every second layer (chunks of 64, top-4); the Qwen2 model
//! has the same hidden size, layers and heads (4:1 grouped-query) and its MLP widened to the
//! same parameter count, with kiln's blocked attention.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

use kiln_models::{ConvgptConfig, FamilyConfig, Init, KilnAutodiffBackend, Model, Qwen2Config};

type B = Autodiff<Flex>;

/// Seconds per forward + backward of `model` over `[batch, seq]` token ids.
fn time_model<A: KilnAutodiffBackend>(
    model: &Model<A>,
    batch: usize,
    seq: usize,
    iters: usize,
) -> f64 {
    let device = Default::default();
    let vocab = model.vocab_size();
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| (i * 7919 % vocab) as i64)
        .collect();
    let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let step = || {
        let logits = model.forward(ids.clone()).logits;
        let grads = logits.square().mean().backward();
        drop(grads);
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
    let (hidden, layers, iters, every) = (arg(0, 256), arg(1, 4), arg(2, 2), arg(3, 2));
    let heads = (hidden / 32).max(1);
    let vocab = 4096;
    let device = Default::default();
    let section: kiln_recipe::ConvgptSection = toml::from_str(&format!(
        "vocab_size = {vocab}\nhidden_size = {hidden}\nnum_layers = {layers}\nintermediate_size = {}\nnum_heads = {heads}\ngrid_order = 8\nmemory_every = {every}\nmemory_chunk = 64\nmemory_top_k = 4",
        hidden * 8 / 3
    ))
    .expect("convgpt section");
    let conv_cfg = ConvgptConfig::from_section(&section);
    let kv = heads.div_ceil(4);
    let mut qwen_cfg = Qwen2Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: 1,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        max_position_embeddings: 4096,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        initializer_range: 0.02,
    };
    // Widen the MLP until the parameter counts match.
    let base = qwen_cfg.num_params();
    let per_unit = 3 * hidden as u64 * layers as u64;
    qwen_cfg.intermediate_size =
        1 + ((conv_cfg.num_params().saturating_sub(base)) / per_unit) as usize;
    let conv = Model::Convgpt(conv_cfg.init::<B>(&Init::new(1), &device));
    let qwen = Model::Qwen2(qwen_cfg.init::<B>(&Init::new(1), &device));
    println!(
        "forward+backward, 4096 tokens per iteration, {iters} iterations (flex, f32): convgpt {:.2}M params, qwen2 {:.2}M params (intermediate {})",
        conv_cfg.num_params() as f64 / 1e6,
        qwen_cfg.num_params() as f64 / 1e6,
        qwen_cfg.intermediate_size
    );
    println!(
        "| T | batch | convgpt tokens/s | qwen2 tokens/s | convgpt / qwen2 | convgpt GFLOP/s | qwen2 GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let lengths: Vec<usize> = match std::env::var("KILN_BENCH_T") {
        Ok(t) => vec![t.parse().expect("KILN_BENCH_T is a length")],
        Err(_) => vec![512, 1024, 2048],
    };
    for seq in lengths {
        let batch = 4096 / seq;
        let c = time_model(&conv, batch, seq, iters);
        let q = time_model(&qwen, batch, seq, iters);
        let tokens = (batch * seq) as f64;
        println!(
            "| {seq} | {batch} | {:.0} | {:.0} | {:.2}x | {:.1} | {:.1} |",
            tokens / c,
            tokens / q,
            q / c,
            conv_cfg.flops_per_token(seq) * tokens / c / 1e9,
            qwen_cfg.flops_per_token(seq) * tokens / q / 1e9,
        );
    }
}
