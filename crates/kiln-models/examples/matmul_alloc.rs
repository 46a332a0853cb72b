//! What recycling large allocations ([`kiln_models::alloc::RecyclingAlloc`]) does to the
//! CPU backend's matmuls: each Flex matmul at the qwen2 bench's projection and LM-head
//! shapes, forward and backward on `Autodiff<Flex>`, against the same gemm call into
//! memory it reuses. Run it twice to compare:
//!
//!     KILN_ALLOC_CACHE_MB=0 cargo run -p kiln-models --example matmul_alloc   # system allocator
//!     cargo run -p kiln-models --example matmul_alloc                         # recycling

mod common;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;

use common::{B, time};

#[global_allocator]
static ALLOC: kiln_models::alloc::RecyclingAlloc = kiln_models::alloc::RecyclingAlloc::new();

/// Median milliseconds of `gemm` computing `[m, k] x [k, n]` into one reused buffer.
#[allow(unsafe_code)]
fn gemm_reused(m: usize, k: usize, n: usize) -> f64 {
    let (a, b) = (vec![0.5f32; m * k], vec![0.25f32; k * n]);
    let mut c = vec![0f32; m * n];
    let mut runs: Vec<f64> = (0..8)
        .map(|_| {
            let t = Instant::now();
            // SAFETY: a, b and c are row-major `m x k`, `k x n` and `m x n`.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            };
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() {
    let cache = std::env::var("KILN_ALLOC_CACHE_MB").unwrap_or_else(|_| "default".into());
    println!("KILN_ALLOC_CACHE_MB={cache}");
    println!("[m, k] x [k, n]          gemm, reused out  Flex fwd   Flex bwd");
    for (m, k, n) in [(2048, 256, 688), (2048, 688, 256), (2048, 256, 4096)] {
        let d = Default::default();
        let x = Tensor::<B, 2>::random([m, k], Distribution::Default, &d).require_grad();
        let w = Tensor::<B, 2>::random([k, n], Distribution::Default, &d).require_grad();
        let (fwd, bwd) = time(8, &|| x.clone().matmul(w.clone()).sum());
        println!(
            "[{m}, {k}] x [{k}, {n}] {:>12.2} ms {:>8.2} ms {:>8.2} ms",
            gemm_reused(m, k, n),
            fwd,
            bwd
        );
    }
}
