//! `kiln doctor`: does a backend compute kiln's operations, and their gradients, as a CPU
//! reference does?
//!
//! Each check builds its inputs on the host from a fixed seed, runs one operation (or one
//! QLoRA projection) forward and backward on the checked backend, and compares every output
//! and input gradient with the same computation on the reference CPU backend (Flex, or
//! NdArray when Flex itself is checked). The sizes are the QLoRA smoke recipe's. Each check
//! runs `repeat` times, to show results that vary from run to run (a race, or an autotuned
//! kernel choice that differs) next to results that are wrong every time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use kiln_models::lora::{LoraSpec, Proj};
use kiln_models::nf4::Nf4Tensor;
use kiln_models::{KilnAutodiffBackend, KilnBackend, ops};
use kiln_recipe::BackendKind;
use kiln_recipe::rng::SplitMix64;

use crate::backend::{Job, dispatch_on};

/// Tokens of the checked activations: the QLoRA smoke recipe's micro-batch, 8 x 256.
const TOKENS: usize = 2048;
/// Hidden and intermediate sizes of the QLoRA smoke recipe.
const HIDDEN: usize = 128;
const INTERMEDIATE: usize = 352;

/// What `kiln doctor` is asked.
pub struct DoctorOptions {
    /// The backend checked.
    pub backend: BackendKind,
    /// Its device (`cpu`, `cuda:N`).
    pub device: String,
    /// Runs of each check on the checked backend.
    pub repeat: usize,
    /// Largest accepted `max |a - b| / max |reference|` of an output.
    pub tolerance: f64,
    /// Where to write the results as JSON.
    pub json: Option<PathBuf>,
}

/// The checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Matmul,
    UploadedTransposedMatmul,
    ComputedTransposedMatmul,
    Nf4Weight,
    Nf4Linear,
    Nf4LinearDown,
    QloraProjection,
    Attention,
    CrossEntropy,
    Swiglu,
    RmsNorm,
    Rope,
    CausalDepthwise,
    ScaleRows,
    ChunkAttention,
}

const CHECKS: [Check; 15] = [
    Check::Matmul,
    Check::UploadedTransposedMatmul,
    Check::ComputedTransposedMatmul,
    Check::Nf4Weight,
    Check::Nf4Linear,
    Check::Nf4LinearDown,
    Check::QloraProjection,
    Check::Attention,
    Check::CrossEntropy,
    Check::Swiglu,
    Check::RmsNorm,
    Check::Rope,
    Check::CausalDepthwise,
    Check::ScaleRows,
    Check::ChunkAttention,
];

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Matmul => "matmul",
            Check::UploadedTransposedMatmul => "matmul, uploaded rhs transposed",
            Check::ComputedTransposedMatmul => "matmul, computed rhs transposed",
            Check::Nf4Weight => "nf4 weight expansion",
            Check::Nf4Linear => "nf4 linear, up",
            Check::Nf4LinearDown => "nf4 linear, down",
            Check::QloraProjection => "qlora projection",
            Check::Attention => "attention",
            Check::CrossEntropy => "cross-entropy",
            Check::Swiglu => "swiglu",
            Check::RmsNorm => "rms norm",
            Check::Rope => "rope",
            Check::CausalDepthwise => "causal depthwise conv",
            Check::ScaleRows => "scale rows",
            Check::ChunkAttention => "chunk attention",
        }
    }

    fn shapes(self) -> String {
        let (n, d, i) = (TOKENS, HIDDEN, INTERMEDIATE);
        match self {
            Check::Matmul => format!("[{n}, {d}] x [{d}, {i}]"),
            Check::UploadedTransposedMatmul => format!("[{n}, {d}] x [{i}, {d}]^T"),
            Check::ComputedTransposedMatmul => format!("[{n}, {d}] x ([{i}, {d}] * s)^T"),
            Check::Nf4Weight => format!("[{i}, {d}]"),
            Check::Nf4Linear => format!("[{n}, {d}] x nf4 [{i}, {d}]^T"),
            Check::Nf4LinearDown => format!("[{n}, {i}] x nf4 [{d}, {i}]^T"),
            Check::QloraProjection => format!("[{n}, {d}] -> [{n}, {i}], r 8"),
            Check::Attention => "q [8, 4, 256, 32], kv [8, 2, 256, 32], causal".into(),
            Check::CrossEntropy => format!("[{n}, 1024]"),
            Check::Swiglu => format!("[{n}, {i}]"),
            Check::RmsNorm => format!("[{n}, {d}]"),
            Check::Rope => "[8, 256, 4, 32]".into(),
            Check::CausalDepthwise => format!("[8, 256, {d}], kernel 4"),
            Check::ScaleRows => format!("[8, 256, {d}] x [8, 256, 1]"),
            Check::ChunkAttention => "[2, 256, 4, 32], chunks of 32, 2 picks".into(),
        }
    }
}

/// Named outputs of one run of a check: the forward values, then each input's gradient.
type Outputs = Vec<(&'static str, Vec<f32>)>;

/// `n` values in `[-1, 1)` from `seed`.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
        .collect()
}

fn constant<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(n, seed), shape), device)
}

fn leaf<B: AutodiffBackend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    constant::<B, D>(shape, seed, device).require_grad()
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 values")
}

/// The forward values of `out` and the gradients of `sum(out * u)`, for a fixed `u`.
fn backward<B: AutodiffBackend, const D: usize>(out: Tensor<B, D>) -> (Vec<f32>, B::Gradients) {
    let device = out.device();
    let upstream = constant::<B, D>(out.dims(), 99, &device);
    let grads = (out.clone() * upstream).sum().backward();
    (host(out), grads)
}

fn grad<B: AutodiffBackend, const D: usize>(t: &Tensor<B, D>, grads: &B::Gradients) -> Vec<f32> {
    t.grad(grads).map(host).unwrap_or_default()
}

fn float<B: Backend, const D: usize>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The outputs of an attention check: its values, then the gradients of `q`, `k` and `v`.
fn attention_outputs<B: AutodiffBackend>(
    out: burn::tensor::ops::FloatTensor<B>,
    [q, k, v]: [&Tensor<B, 4>; 3],
) -> Outputs {
    let (y, g) = backward(float::<B, 4>(out));
    vec![
        ("output", y),
        ("d q", grad(q, &g)),
        ("d k", grad(k, &g)),
        ("d v", grad(v, &g)),
    ]
}

/// An NF4 weight of the checks, `[out, in]` (Hugging Face layout).
fn nf4_weight(shape: [usize; 2]) -> Arc<Nf4Tensor> {
    let w: Vec<f32> = values(shape[0] * shape[1], 7)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    Arc::new(Nf4Tensor::quantize(&w, &shape))
}

/// One run of `check` on backend `B`.
fn compute<B: KilnAutodiffBackend>(check: Check, device: &B::Device) -> Outputs {
    let (n, d, i) = (TOKENS, HIDDEN, INTERMEDIATE);
    match check {
        Check::Matmul => {
            let (x, w) = (
                leaf::<B, 2>([n, d], 1, device),
                leaf::<B, 2>([d, i], 2, device),
            );
            let (y, g) = backward(x.clone().matmul(w.clone()));
            vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
        }
        Check::UploadedTransposedMatmul => {
            // A weight uploaded from the host just before use, transposed, as kiln's default
            // NF4 path (dequantized on the host) computes.
            let x = leaf::<B, 2>([n, d], 1, device);
            let w = constant::<B, 2>([i, d], 2, device);
            let (y, g) = backward(x.clone().matmul(w.transpose()));
            vec![("output", y), ("d x", grad(&x, &g))]
        }
        Check::ComputedTransposedMatmul => {
            // The shape of an NF4 layer's matmul: a weight produced by tensor ops just before
            // use, transposed, against activations.
            let x = leaf::<B, 2>([n, d], 1, device);
            let w = constant::<B, 2>([i, d], 2, device) * constant::<B, 2>([1, d], 3, device);
            let (y, g) = backward(x.clone().matmul(w.transpose()));
            vec![("output", y), ("d x", grad(&x, &g))]
        }
        Check::Nf4Weight => {
            let w = nf4_weight([i, d]);
            let inner = B::InnerBackend::nf4_weight(&w, device);
            vec![("weight", host(float::<B::InnerBackend, 2>(inner)))]
        }
        Check::Nf4Linear | Check::Nf4LinearDown => {
            // x · Wᵀ for W [out, in]: [intermediate, hidden] up, [hidden, intermediate] down.
            let (w, inp) = match check {
                Check::Nf4Linear => (nf4_weight([i, d]), d),
                _ => (nf4_weight([d, i]), i),
            };
            let x = leaf::<B, 2>([n, inp], 1, device);
            let y = float::<B, 2>(B::nf4_linear(x.clone().into_primitive().tensor(), &w));
            let (y, g) = backward(y);
            vec![("output", y), ("d x", grad(&x, &g))]
        }
        Check::QloraProjection => {
            let base = Linear {
                weight: Param::from_tensor(constant::<B, 2>([d, i], 4, device) * 0.1),
                bias: None,
            };
            let spec = LoraSpec {
                rank: 8,
                scale: 2.0,
                dropout: 0.0,
                nf4: true,
            };
            let mut proj =
                Proj::from(base).with_lora(spec, constant::<B, 2>([d, 8], 5, device), device);
            // B starts at zero in training; a nonzero B lets every path carry a gradient.
            proj.lora_B = Some(Linear {
                weight: Param::from_tensor(constant::<B, 2>([8, i], 6, device)),
                bias: None,
            });
            let x = leaf::<B, 2>([n, d], 1, device);
            let (y, g) = backward(proj.forward(x.clone()));
            let param = |l: &Option<Linear<B>>| l.as_ref().expect("an adapter").weight.val();
            vec![
                ("output", y),
                ("d x", grad(&x, &g)),
                ("d lora_A", grad(&param(&proj.lora_A), &g)),
                ("d lora_B", grad(&param(&proj.lora_B), &g)),
            ]
        }
        Check::Attention => {
            let q = leaf::<B, 4>([8, 4, 256, 32], 1, device);
            let k = leaf::<B, 4>([8, 2, 256, 32], 2, device);
            let v = leaf::<B, 4>([8, 2, 256, 32], 3, device);
            let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
            let out = B::kiln_attention(prim(&q), prim(&k), prim(&v), None, 32f64.powf(-0.5), true);
            attention_outputs::<B>(out, [&q, &k, &v])
        }
        Check::CrossEntropy => {
            let logits = (constant::<B, 2>([n, 1024], 1, device) * 4.0).require_grad();
            let targets: Vec<i64> = (0..n as i64).map(|r| (r * 37) % 1024).collect();
            let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
            let out = B::kiln_cross_entropy(
                logits.clone().into_primitive().tensor(),
                targets.into_primitive(),
            );
            let (y, g) = backward(float::<B, 1>(out));
            vec![("output", y), ("d logits", grad(&logits, &g))]
        }
        Check::Swiglu => {
            let (a, b) = (
                leaf::<B, 2>([n, i], 1, device),
                leaf::<B, 2>([n, i], 2, device),
            );
            let (y, g) = backward(ops::swiglu(a.clone(), b.clone()));
            vec![
                ("output", y),
                ("d gate", grad(&a, &g)),
                ("d up", grad(&b, &g)),
            ]
        }
        Check::RmsNorm => {
            let (x, w) = (
                leaf::<B, 2>([n, d], 1, device),
                leaf::<B, 1>([d], 2, device),
            );
            let (y, g) = backward(ops::rms_norm(x.clone(), w.clone(), 1e-6));
            vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
        }
        Check::Rope => {
            let x = leaf::<B, 4>([8, 256, 4, 32], 1, device);
            let (cos, sin) = (
                constant::<B, 2>([256, 32], 2, device),
                constant::<B, 2>([256, 32], 3, device),
            );
            let out = B::kiln_rope(
                x.clone().into_primitive().tensor(),
                cos.into_primitive().tensor(),
                sin.into_primitive().tensor(),
            );
            let (y, g) = backward(float::<B, 4>(out));
            vec![("output", y), ("d x", grad(&x, &g))]
        }
        Check::CausalDepthwise => {
            let (x, w) = (
                leaf::<B, 3>([8, 256, d], 1, device),
                leaf::<B, 2>([d, 4], 2, device),
            );
            let (y, g) = backward(ops::causal_depthwise(x.clone(), w.clone()));
            vec![("output", y), ("d x", grad(&x, &g)), ("d w", grad(&w, &g))]
        }
        Check::ScaleRows => {
            let (x, s) = (
                leaf::<B, 3>([8, 256, d], 1, device),
                leaf::<B, 3>([8, 256, 1], 2, device),
            );
            let (y, g) = backward(ops::scale_rows(x.clone(), s.clone()));
            vec![("output", y), ("d x", grad(&x, &g)), ("d s", grad(&s, &g))]
        }
        Check::ChunkAttention => {
            let shape = [2, 256, 4, 32];
            let (q, k, v) = (
                leaf::<B, 4>(shape, 1, device),
                leaf::<B, 4>(shape, 2, device),
                leaf::<B, 4>(shape, 3, device),
            );
            // Query t (in chunk t / 32) picks the two chunks before its own, where they exist.
            let picks: Vec<i64> = (0..2 * 4 * 256)
                .flat_map(|r| {
                    let c = (r % 256 / 32) as i64;
                    [c - 1, c - 2]
                })
                .collect();
            let picks =
                Tensor::<B, 4, Int>::from_data(TensorData::new(picks, [2, 4, 256, 2]), device);
            let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
            let out = B::kiln_chunk_attention(
                prim(&q),
                prim(&k),
                prim(&v),
                Some(picks.into_primitive()),
                32,
                32f64.powf(-0.5),
            );
            attention_outputs::<B>(out, [&q, &k, &v])
        }
    }
}

/// `max |a - b| / max |reference|` (infinite where the lengths differ or a value is not
/// finite).
fn relative_error(values: &[f32], reference: &[f32]) -> f64 {
    if values.len() != reference.len() {
        return f64::INFINITY;
    }
    let scale = reference
        .iter()
        .fold(0f64, |m, r| m.max(f64::from(r.abs())));
    let diff = values
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0f64, |m, e| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        });
    if values.iter().any(|v| !v.is_finite()) || diff.is_nan() {
        return f64::INFINITY;
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

/// One compared output.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    check: &'static str,
    shapes: String,
    output: &'static str,
    /// The largest relative error over the repeats.
    error: f64,
    /// The largest relative difference between two repeats (0: the same every time).
    spread: f64,
    pass: bool,
}

/// Runs every check on the reference backend.
struct Reference;

impl Job for Reference {
    type Output = Vec<Outputs>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        Ok(CHECKS.iter().map(|c| compute::<B>(*c, &device)).collect())
    }
}

/// Runs every check on the checked backend, printing each as it ends.
struct Checked<'a> {
    reference: Vec<Outputs>,
    opts: &'a DoctorOptions,
}

impl Job for Checked<'_> {
    type Output = Vec<Row>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        let mut rows = Vec::new();
        for (check, reference) in CHECKS.iter().zip(&self.reference) {
            let start = Instant::now();
            let runs: Vec<Outputs> = (0..self.opts.repeat.max(1))
                .map(|_| compute::<B>(*check, &device))
                .collect();
            for (k, (output, expected)) in reference.iter().enumerate() {
                let error = runs
                    .iter()
                    .map(|r| relative_error(&r[k].1, expected))
                    .fold(0f64, f64::max);
                let spread = runs
                    .iter()
                    .map(|r| relative_error(&r[k].1, &runs[0][k].1))
                    .fold(0f64, f64::max);
                let row = Row {
                    check: check.name(),
                    shapes: check.shapes(),
                    output,
                    error,
                    spread,
                    pass: error <= self.opts.tolerance,
                };
                print_row(&row, (k == 0).then(|| start.elapsed().as_secs_f64()));
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

fn print_row(row: &Row, seconds: Option<f64>) {
    if let Some(s) = seconds {
        println!("{}  {}  ({s:.1} s)", row.check, row.shapes);
    }
    let spread = if row.spread == 0.0 {
        "same every run".to_string()
    } else {
        format!("varies by {:.1e} between runs", row.spread)
    };
    println!(
        "  {:<4} {:<10} {:>9.2e}  {spread}",
        if row.pass { "ok" } else { "FAIL" },
        row.output,
        row.error
    );
}

/// Runs the checks; fails when an output differs from the reference beyond the tolerance.
pub fn doctor(opts: &DoctorOptions) -> Result<()> {
    let reference_kind = if opts.backend == BackendKind::Flex {
        BackendKind::Ndarray
    } else {
        BackendKind::Flex
    };
    if opts.tolerance.is_nan() || opts.tolerance <= 0.0 {
        bail!("--tolerance must be positive, got {}", opts.tolerance);
    }
    eprintln!(
        "kiln doctor: {} on {} against {} on the CPU, {} run(s) per check, tolerance {:.0e} \
         (max |a - b| / max |reference| per output)",
        opts.backend.as_str(),
        opts.device,
        reference_kind.as_str(),
        opts.repeat.max(1),
        opts.tolerance
    );
    let reference = dispatch_on(reference_kind, "cpu", Reference)?;
    let rows = dispatch_on(opts.backend, &opts.device, Checked { reference, opts })?;
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&rows)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| format!("{} ({})", r.check, r.output))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} outputs on {} differ from the CPU reference beyond {:.0e}: {}",
            failed.len(),
            rows.len(),
            opts.backend.as_str(),
            opts.tolerance,
            failed.join(", ")
        );
    }
    eprintln!(
        "kiln doctor: all {} outputs match the reference",
        rows.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relative_error_sees_a_changed_value_a_short_output_and_a_nan() {
        let reference = [1.0, -2.0, 4.0];
        assert_eq!(relative_error(&reference, &reference), 0.0);
        assert!((relative_error(&[1.0, -2.0, 4.4], &reference) - 0.1).abs() < 1e-6);
        assert_eq!(relative_error(&[1.0, -2.0], &reference), f64::INFINITY);
        assert_eq!(
            relative_error(&[1.0, f32::NAN, 4.0], &reference),
            f64::INFINITY
        );
    }
}
