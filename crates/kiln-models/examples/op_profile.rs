//! Where a Qwen2 step's time goes, op by op: each building block of the qwen2 bench model
//! (`recipes/bench/qwen2-tiny-bench.toml`: batch 8 x 256, hidden 256, 8/2 heads of 32,
//! intermediate 688, vocab 4096) timed forward and backward on `Autodiff<Flex>`, alone, at
//! the model's shapes. `scripts/op_profile_torch.py` times the same blocks in PyTorch.
//!
//!     cargo run --example op_profile [ITERS]

mod common;

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Distribution, TensorPrimitive};
use kiln_models::KilnBackend;

use common::{B, time};

const BATCH: usize = 8;
const SEQ: usize = 256;
const HIDDEN: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 32;
const INTER: usize = 688;
const VOCAB: usize = 4096;

fn rand<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 0.5), &Default::default()).require_grad()
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let x = rand([BATCH, SEQ, HIDDEN]);
    let w_qkv = rand([HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM]);
    let w_o = rand([HIDDEN, HIDDEN]);
    let w_up = rand([HIDDEN, INTER]);
    let w_down = rand([INTER, HIDDEN]);
    let w_head = rand([HIDDEN, VOCAB]);
    let h = rand([BATCH, SEQ, INTER]);
    let g = rand([BATCH, SEQ, INTER]);
    let norm_w = rand([HIDDEN]);
    // Heads as the model passes them: views of the [b, t, heads, d] projections.
    let q = rand([BATCH, SEQ, HEADS, HEAD_DIM]);
    let k = rand([BATCH, SEQ, KV_HEADS, HEAD_DIM]);
    let v = rand([BATCH, SEQ, KV_HEADS, HEAD_DIM]);
    let logits = rand([BATCH * SEQ, VOCAB]);
    let rot = rand([BATCH, SEQ, HEADS, HEAD_DIM]);
    let cos = Tensor::<B, 2>::random([SEQ, HEAD_DIM], Distribution::Default, &Default::default());
    // Projections run as 2-D matmuls over all positions, as the models do.
    let x2 = x.clone().reshape([BATCH * SEQ, HIDDEN]);
    let lin = |w: &Tensor<B, 2>| {
        let (x, w) = (x2.clone(), w.clone());
        move || burn::tensor::module::linear(x.clone(), w.clone(), None).sum()
    };
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, usize, Box<dyn Fn() -> Tensor<B, 1>>)> = vec![
        ("linear qkv 256->384", 4, Box::new(lin(&w_qkv))),
        ("linear o 256->256", 4, Box::new(lin(&w_o))),
        ("linear gate+up 256->688", 8, Box::new(lin(&w_up))),
        (
            "linear down 688->256",
            4,
            Box::new(|| {
                let h = h.clone().reshape([BATCH * SEQ, INTER]);
                burn::tensor::module::linear(h, w_down.clone(), None).sum()
            }),
        ),
        ("linear head 256->4096", 1, Box::new(lin(&w_head))),
        (
            "swiglu (kiln)",
            4,
            Box::new(|| kiln_models::ops::swiglu(g.clone(), h.clone()).sum()),
        ),
        (
            "rmsnorm",
            9,
            Box::new(|| {
                let rms = x.clone().square().mean_dim(2).add_scalar(1e-6).sqrt();
                (x.clone().div(rms) * norm_w.clone().unsqueeze::<3>()).sum()
            }),
        ),
        (
            "rope (kiln, q)",
            4,
            Box::new(|| {
                Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::kiln_rope(
                    rot.clone().into_primitive().tensor(),
                    cos.clone().into_primitive().tensor(),
                    cos.clone().into_primitive().tensor(),
                )))
                .sum()
            }),
        ),
        (
            "attention core",
            4,
            Box::new(|| {
                Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::kiln_attention(
                    q.clone().swap_dims(1, 2).into_primitive().tensor(),
                    k.clone().swap_dims(1, 2).into_primitive().tensor(),
                    v.clone().swap_dims(1, 2).into_primitive().tensor(),
                    None,
                    1.0 / (HEAD_DIM as f64).sqrt(),
                    true,
                )))
                .sum()
            }),
        ),
        (
            "log_softmax + gather",
            0,
            Box::new(|| {
                let idx = Tensor::<B, 2, Int>::zeros([BATCH * SEQ, 1], &Default::default());
                log_softmax(logits.clone(), 1).gather(1, idx).sum()
            }),
        ),
        (
            "cross-entropy (kiln)",
            1,
            Box::new(|| {
                let idx = Tensor::<B, 1, Int>::zeros([BATCH * SEQ], &Default::default());
                Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::kiln_cross_entropy(
                    logits.clone().into_primitive().tensor(),
                    idx.into_primitive(),
                )))
                .sum()
            }),
        ),
        (
            "residual add",
            8,
            Box::new(|| (x.clone() + x.clone()).sum()),
        ),
    ];
    println!(
        "{:<26} {:>9} {:>9} {:>6} {:>11}",
        "op (batch 8 x 256)", "fwd ms", "bwd ms", "x/step", "ms/step"
    );
    let mut total = 0.0;
    for (name, per_step, op) in &cases {
        let (f, b) = time(iters, op.as_ref());
        let step = (f + b) * *per_step as f64;
        total += step;
        println!("{name:<26} {f:>9.2} {b:>9.2} {per_step:>6} {step:>11.1}");
    }
    println!("{:<26} {:>9} {:>9} {:>6} {total:>11.1}", "sum", "", "", "");
}
