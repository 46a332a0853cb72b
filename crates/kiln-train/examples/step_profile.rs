//! Where a training step's time goes: forward, loss, backward, gradient collection and the
//! optimizer, timed separately on a recipe's model (flex backend), after a warmup:
//!
//!     cargo run --release --example step_profile -- recipes/bench/qwen2-tiny-bench.toml 5

use std::time::Instant;

use burn::backend::{Autodiff, Flex};

use kiln_data::DataPipeline;
use kiln_models::{Model, ModelSpec};
use kiln_train::loss::{input_tensor, masked_nll};
use kiln_train::optim::{AdamW, GradAccumulator};

type B = Autodiff<Flex>;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("a recipe path");
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let loaded = kiln_recipe::load(std::path::Path::new(&path), &[]).expect("recipe");
    let recipe = loaded.recipe;
    let device = Default::default();
    let spec = ModelSpec::from_recipe(&recipe).expect("spec");
    let data = DataPipeline::new(&recipe, spec.vocab_size()).expect("data");
    let mut cursor = data.initial_cursor(0);
    let mut model = Model::<B>::for_training(&recipe, &device).expect("model");
    let mut optim = AdamW::<Flex>::new(&recipe.optim);
    let names = [
        "data",
        "forward",
        "loss",
        "backward",
        "collect",
        "norm",
        "optimizer",
    ];
    let mut totals = [0.0f64; 7];
    for it in 0..iters + 1 {
        let mut t = [0.0f64; 7];
        let mut clock = Instant::now();
        let mut lap = |i: usize, t: &mut [f64; 7]| {
            t[i] += clock.elapsed().as_secs_f64();
            clock = Instant::now();
        };
        let batch = data.next_batch(0, &mut cursor).expect("a batch");
        let ids = input_tensor::<B>(&batch, &device);
        lap(0, &mut t);
        let out = model.forward(ids);
        let _ = out.logits.clone().slice([0..1, 0..1, 0..1]).into_scalar();
        lap(1, &mut t);
        let (nll, _) = masked_nll(out.logits, &batch, &device);
        let loss = nll.div_scalar(batch.trained_tokens().max(1) as f64);
        let _ = loss.clone().into_scalar();
        lap(2, &mut t);
        let grads = loss.backward();
        lap(3, &mut t);
        let mut acc = GradAccumulator::<Flex>::default();
        acc.accumulate::<B, _>(&model, grads);
        lap(4, &mut t);
        let _ = acc.global_norm();
        lap(5, &mut t);
        model = optim
            .step::<B, _>(model, acc.take(), 1e-3, &Default::default())
            .expect("the optimizer step");
        let _ = kiln_models::named_params(&model).len();
        lap(6, &mut t);
        if it > 0 {
            for (a, b) in totals.iter_mut().zip(t) {
                *a += b;
            }
        }
    }
    let all: f64 = totals.iter().sum();
    for (n, s) in names.iter().zip(totals) {
        println!(
            "{n:<10} {:>8.1} ms/step {:>5.1}%",
            1e3 * s / iters as f64,
            100.0 * s / all
        );
    }
    println!("total      {:>8.1} ms/step", 1e3 * all / iters as f64);
}
