//! Peak memory of a training step through `layers` chained causal attentions, kiln's
//! blocked attention (whose backward recomputes the probabilities) against the dense
//! formulation Burn's autodiff records. One mode per process, so each peak is its own:
//!
//!     cargo run --example attention_memory -- kiln 2048
//!     cargo run --example attention_memory -- dense 2048
//!     cargo run --example attention_memory -- model 2048 4   # the Qwen2 smoke architecture

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::activation::softmax;

use kiln_models::KilnBackend;

type B = Autodiff<Flex>;

fn peak_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "kiln".to_string());
    let t: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    if mode == "model" {
        let layers = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
        model_step(t, layers, args.next().is_some());
        return;
    }
    let (b, h, d, layers) = (4, 4, 32, 4);
    let device = Default::default();
    let mut causal = vec![0.0f32; t * t];
    for r in 0..t {
        for c in r + 1..t {
            causal[r * t + c] = f32::NEG_INFINITY;
        }
    }
    let bias = Tensor::<B, 4>::from_data(TensorData::new(causal, [1, 1, t, t]), &device);
    let x0 = Tensor::<B, 4>::random(
        [b, h, t, d],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    )
    .require_grad();
    let before = peak_mb();
    let start = std::time::Instant::now();
    let mut x = x0.clone();
    for _ in 0..layers {
        x = match mode.as_str() {
            "dense" => softmax(
                x.clone().matmul(x.clone().swap_dims(2, 3)).mul_scalar(0.2) + bias.clone(),
                3,
            )
            .matmul(x.clone()),
            _ => Tensor::from_primitive(TensorPrimitive::Float(B::kiln_attention(
                x.clone().into_primitive().tensor(),
                x.clone().into_primitive().tensor(),
                x.clone().into_primitive().tensor(),
                None,
                0.2,
                true,
            ))),
        } + x;
    }
    let grads = x.sum().backward();
    let g = x0.grad(&grads).expect("gradient").sum().into_scalar();
    println!(
        "{mode}: t={t}, {layers} layers: peak RSS {} MB (setup {before} MB), {:.2} s, grad sum {g:.4}",
        peak_mb(),
        start.elapsed().as_secs_f64()
    );
}

/// `model <t> <layers> [pad]`: the Qwen2 smoke architecture's training step instead.
fn model_step(t: usize, layers: usize, pad: bool) {
    let device = Default::default();
    let model = kiln_models::Model::Qwen2(
        kiln_models::Qwen2Config {
            vocab_size: 260,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: t,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            initializer_range: 0.02,
        }
        .init::<B>(&kiln_models::Init::new(5), &device),
    );
    let b = 4;
    let ids: Vec<i64> = (0..b * t).map(|i| (i % 250) as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let padding = pad.then(|| Tensor::<B, 2>::zeros([b, t], &device).equal_elem(1.0));
    let before = peak_mb();
    let logits = model
        .forward_masked(ids, padding)
        .expect("qwen2 masks any padding")
        .logits;
    let after_forward = peak_mb();
    let grads = logits.powi_scalar(2).mean().backward();
    drop(grads);
    println!(
        "model t={t} layers={layers} pad={pad}: peak RSS {before} MB before, {after_forward} MB after forward, {} MB after backward",
        peak_mb()
    );
}
