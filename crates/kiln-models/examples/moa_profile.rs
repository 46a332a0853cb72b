//! Where an MoA block's time goes, part by part: each path, expert, router and the
//! triangle penalty of the first block of `recipes/bench/moa-bench.toml`'s model (hidden
//! 256, 8 heads, intermediate 688, batch 8 x 256), forward and backward on `Autodiff<Flex>`:
//!
//!     cargo run --example moa_profile [ITERS]

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use kiln_models::moa::{metric, route};
use kiln_models::{Family, Init, MoaConfig};

use common::{B, time};

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (batch, seq, hidden) = (8, 256, 256);
    let section: kiln_recipe::MoaSection = toml::from_str(
        "vocab_size = 4096\nhidden_size = 256\nnum_layers = 4\nnum_heads = 8\nintermediate_size = 688",
    )
    .expect("moa section");
    let device = Default::default();
    let model = MoaConfig::from_section(&section).init::<B>(&Init::new(1), &device);
    let ids = Tensor::<B, 2, Int>::zeros([batch, seq], &device);
    let ctx = model.context(&ids);
    let h = Tensor::<B, 3>::random(
        [batch, seq, hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .require_grad();
    let up = Tensor::<B, 3>::random(
        [batch, seq, hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let blk = &model.blocks[0];
    let (m, f) = (&blk.moa, &blk.ffn);
    let loss = |y: Tensor<B, 3>| (y * up.clone()).sum();
    #[allow(clippy::type_complexity)]
    let parts: Vec<(&str, Box<dyn Fn() -> Tensor<B, 1>>)> = vec![
        ("rmsnorm", Box::new(|| loss(blk.norm1.forward(h.clone())))),
        (
            "router + top-2",
            Box::new(|| {
                let r = route(m.router.forward(h.clone()), 2);
                (r.weights * up.clone().narrow(2, 0, 4)).sum()
            }),
        ),
        ("path: conv", Box::new(|| loss(m.conv.forward(h.clone())))),
        (
            "path: metric attention",
            Box::new(|| loss(m.attn.forward(h.clone(), &ctx.tables).0)),
        ),
        ("path: mix", Box::new(|| loss(m.mix.forward(h.clone())))),
        (
            "path: mqa",
            Box::new(|| loss(m.mqa.forward(h.clone(), &ctx.tables).0)),
        ),
        (
            "triangle penalty (attn)",
            Box::new(|| metric::triangle_penalty(&m.attn.forward(h.clone(), &ctx.tables).1, 64)),
        ),
        (
            "expert: swiglu",
            Box::new(|| {
                let s = &f.swiglu;
                loss(s.down_proj.forward(kiln_models::ops::swiglu(
                    s.gate_proj.forward(h.clone()),
                    s.up_proj.forward(h.clone()),
                )))
            }),
        ),
        ("expert: conv", Box::new(|| loss(f.conv.forward(h.clone())))),
    ];
    println!(
        "{:<26} {:>9} {:>9}",
        "part (batch 8 x 256)", "fwd ms", "bwd ms"
    );
    for (name, op) in &parts {
        let (fwd, bwd) = time(iters, op.as_ref());
        println!("{name:<26} {fwd:>9.2} {bwd:>9.2}");
    }
}
