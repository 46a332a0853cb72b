//! `kiln bench`: real optimizer steps of a recipe's model, timed.
//!
//! The recipe's model trains on its own data pipeline and optimizer in a temporary run
//! directory: one phase (the first, or `--phase`), `--warmup` untimed steps and `--steps`
//! timed ones, no evaluation and no checkpoint until the end. The summary goes to stderr;
//! the JSON result (everything `scripts/bench_torch.py --like` needs to run the same
//! configuration in PyTorch) to stdout and, with `--json`, to a file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use kiln_models::ModelSpec;
use kiln_recipe::{BackendKind, LoadedRecipe, ModelFamily, Recipe};
use kiln_train::{Control, Event, Observer, RunDir, StepMetrics};

use crate::backend::{Job, dispatch};

/// Options of `kiln bench`.
#[derive(Debug)]
pub struct BenchOptions {
    /// Timed steps.
    pub steps: u64,
    /// Untimed steps first.
    pub warmup: u64,
    /// The phase whose batch shape is measured.
    pub phase: usize,
    /// The machine's peak GFLOP/s, instead of the detected one.
    pub peak_gflops: Option<f64>,
    /// Where to write the JSON result too.
    pub json: Option<PathBuf>,
}

/// The machine's peak f32 throughput and how it was estimated.
#[derive(Debug, Clone, Serialize)]
pub struct Peak {
    /// GFLOP/s.
    pub gflops: f64,
    /// How it was estimated.
    pub basis: String,
}

/// A CPU's peak from `/proc/cpuinfo`: cores x clock x SIMD lanes x 2 (FMA) x 2 FMA units.
fn cpu_peak() -> Peak {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(2000.0);
    let flags = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let (lanes, isa) = if has("avx512f") {
        (16.0, "AVX-512")
    } else if has("avx2") && has("fma") {
        (8.0, "AVX2+FMA")
    } else {
        (4.0, "SSE")
    };
    let gflops = cores as f64 * mhz / 1000.0 * lanes * 2.0 * 2.0;
    Peak {
        gflops,
        basis: format!(
            "{cores} cores x {:.2} GHz x {lanes} f32 lanes ({isa}) x 2 (FMA) x 2 FMA units",
            mhz / 1000.0
        ),
    }
}

/// An NVIDIA GPU's name, from `nvidia-smi`.
fn gpu_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i"])
        .arg(index.to_string())
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

/// A GPU's peak f32 throughput on its CUDA cores (kiln computes in f32), from the vendor's
/// datasheet for the GPUs kiln has been run on; other GPUs need `--peak-gflops`.
fn gpu_peak(index: usize) -> Result<Peak> {
    let name = gpu_name(index).unwrap_or_else(|| "unknown GPU".to_string());
    let table = [
        ("H200", 66_900.0),
        ("H100 PCIe", 51_200.0),
        ("H100", 66_900.0),
        ("A100", 19_500.0),
        ("L40S", 91_600.0),
        ("A10", 31_200.0),
        ("RTX 4090", 82_600.0),
    ];
    match table.iter().find(|(key, _)| name.contains(key)) {
        Some((_, gflops)) => Ok(Peak {
            gflops: *gflops,
            basis: format!("{name}: datasheet f32 peak without tensor cores"),
        }),
        None => bail!("no peak throughput known for `{name}`: give it with --peak-gflops"),
    }
}

/// Bytes of device memory this process holds on an NVIDIA GPU, from `nvidia-smi`. Burn's
/// CubeCL allocator keeps what it reserved, so this is the high-water mark of the run.
fn gpu_memory_used(index: usize) -> Option<u64> {
    let smi = |args: &[&str]| {
        std::process::Command::new("nvidia-smi")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
    };
    let pid = std::process::id().to_string();
    let mib = smi(&[
        "--query-compute-apps=pid,used_memory",
        "--format=csv,noheader,nounits",
    ])
    .and_then(|text| {
        text.lines().find_map(|l| {
            let (p, m) = l.split_once(',')?;
            (p.trim() == pid).then(|| m.trim().parse::<u64>().ok())?
        })
    })
    // Where processes are not listed (a container without the host's PID namespace), the
    // device's whole use.
    .or_else(|| {
        smi(&[
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            &index.to_string(),
        ])
        .and_then(|t| t.trim().parse::<u64>().ok())
    })?;
    Some(mib << 20)
}

/// What `kiln bench` measured, and the configuration, as JSON.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    /// `kiln`.
    pub framework: &'static str,
    /// The recipe file.
    pub recipe: String,
    /// Model family.
    pub family: &'static str,
    /// Backend.
    pub backend: &'static str,
    /// Parameters.
    pub params: u64,
    /// Model dimensions a same-size dense baseline needs.
    pub model: serde_json::Value,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Optimizer settings.
    pub optim: serde_json::Value,
    /// The recipe's adapter (LoRA / QLoRA), if any.
    pub adapter: Option<serde_json::Value>,
    /// Training settings a counterpart must copy: activation checkpointing, NEFTune, clipping.
    pub train: serde_json::Value,
    /// Timed steps.
    pub steps: u64,
    /// Untimed steps before them.
    pub warmup: u64,
    /// Median seconds per optimizer step.
    pub step_time_s: f64,
    /// Input tokens per second at the median step.
    pub tokens_per_s: f64,
    /// Training FLOPs per token by the model's estimate.
    pub flops_per_token: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
    /// The machine's peak.
    pub peak: Peak,
    /// `gflops / peak`.
    pub mfu: f64,
    /// Peak resident memory of the process, bytes (host memory on every backend).
    pub peak_rss_bytes: Option<u64>,
    /// The GPU (CUDA backend).
    pub device: Option<String>,
    /// Peak device memory held by the process, bytes (CUDA backend; read after every step).
    pub peak_device_bytes: Option<u64>,
    /// Every timed step's seconds.
    pub step_times_s: Vec<f64>,
}

/// The architecture keys a baseline needs, by family.
fn model_json(spec: &ModelSpec) -> serde_json::Value {
    match spec {
        ModelSpec::Qwen2(c) => serde_json::json!({
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
        }),
        ModelSpec::Moa(c) => serde_json::json!({
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "tie_word_embeddings": true,
        }),
        ModelSpec::Convgpt(c) => serde_json::json!({
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "tie_word_embeddings": c.tie_word_embeddings,
        }),
    }
}

/// The recipe reduced to what a benchmark runs: one phase of `warmup + steps` steps in a
/// temporary directory, no evaluation, no intermediate checkpoints, no wall-time limit.
fn bench_recipe(recipe: &Recipe, opts: &BenchOptions, out_dir: &str) -> Result<Recipe> {
    let mut r = recipe.clone();
    if opts.phase >= r.phases.len() {
        bail!(
            "--phase {}: the recipe has {} phases",
            opts.phase,
            r.phases.len()
        );
    }
    let mut phase = r.phases[opts.phase].clone();
    phase.steps = Some(opts.warmup + opts.steps);
    phase.tokens = None;
    phase.epochs = None;
    r.phases = vec![phase];
    r.run.out_dir = out_dir.to_string();
    r.run.name = "bench".to_string();
    r.run.max_wall_time = "none".to_string();
    r.train.eval_every = 0;
    r.train.eval_tokens = 1;
    r.train.convergence_window = 0;
    // TOML integers are i64: the largest one means "never before the end".
    r.train.checkpoint_every = i64::MAX as u64;
    r.schedule.warmup_steps = r.schedule.warmup_steps.min(opts.warmup + opts.steps);
    Ok(r)
}

/// Records the step metrics of a run, and the device memory after each step.
struct Recorder {
    steps: Vec<StepMetrics>,
    gpu: Option<usize>,
    peak_device_bytes: Option<u64>,
}

impl Observer for Recorder {
    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Step(m) => {
                eprintln!(
                    "bench step {:>3} | {:.3} s | {:.0} tokens/s",
                    m.step, m.step_time_s, m.tokens_per_s
                );
                self.steps.push(m.clone());
                if let Some(used) = self.gpu.and_then(gpu_memory_used) {
                    self.peak_device_bytes = Some(self.peak_device_bytes.unwrap_or(0).max(used));
                }
            }
            Event::Warn(w) => eprintln!("warning: {w}"),
            _ => {}
        }
    }
}

struct BenchJob<'a> {
    recipe: &'a Recipe,
    run: &'a RunDir,
    gpu: Option<usize>,
}

impl Job for BenchJob<'_> {
    type Output = Recorder;

    fn run<B: kiln_models::KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut rec = Recorder {
            steps: Vec::new(),
            gpu: self.gpu,
            peak_device_bytes: None,
        };
        kiln_train::train::<B>(
            &device,
            self.recipe,
            self.run,
            None,
            &mut rec,
            &Control {
                stop: &stop,
                stop_after_steps: None,
            },
        )?;
        Ok(rec)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the benchmark and prints its result.
pub fn bench(loaded: &LoadedRecipe, opts: &BenchOptions) -> Result<()> {
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let tmp = tempfile::tempdir().context("creating the benchmark's run directory")?;
    let out_dir = tmp.path().display().to_string();
    let recipe = bench_recipe(&loaded.recipe, opts, &out_dir)?;
    crate::backend::check_training(&recipe)?;
    let spec = ModelSpec::from_recipe(&recipe)?;
    let run = RunDir::create(&recipe, true)?;
    let phase = &recipe.phases[0];
    eprintln!(
        "bench `{}`: {} on {}, phase {} (batch {} x window {} x accum {}), {} warmup + {} timed steps",
        loaded.path.display(),
        recipe.model.family.as_str(),
        recipe.run.backend.as_str(),
        opts.phase,
        phase.batch_size,
        phase.window,
        recipe.train.grad_accum,
        opts.warmup,
        opts.steps
    );
    let gpu = (recipe.run.backend == BackendKind::Cuda).then(|| {
        recipe
            .run
            .device
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    });
    let rec = dispatch(
        &recipe,
        BenchJob {
            recipe: &recipe,
            run: &run,
            gpu,
        },
    )?;
    let timed: Vec<f64> = rec
        .steps
        .iter()
        .skip(opts.warmup as usize)
        .map(|m| m.step_time_s)
        .collect();
    if timed.is_empty() {
        bail!("no timed step completed (every source of the phase stopped early?)");
    }
    let step_time = median(&timed);
    let tokens = recipe.tokens_per_step(phase) as f64;
    let tokens_per_s = tokens / step_time;
    let flops_per_token = spec.flops_per_token(phase.window);
    let gflops = tokens_per_s * flops_per_token / 1e9;
    let peak = match (opts.peak_gflops, gpu) {
        (Some(g), _) => Peak {
            gflops: g,
            basis: "given (--peak-gflops)".to_string(),
        },
        (None, Some(index)) => gpu_peak(index)?,
        (None, None) => cpu_peak(),
    };
    let o = &recipe.optim;
    let result = BenchResult {
        framework: "kiln",
        recipe: loaded.path.display().to_string(),
        family: recipe.model.family.as_str(),
        backend: recipe.run.backend.as_str(),
        params: spec.num_params(),
        model: model_json(&spec),
        batch: phase.batch_size,
        seq: phase.window,
        grad_accum: recipe.train.grad_accum,
        optim: serde_json::json!({
            "kind": match o.kind { kiln_recipe::OptimKind::Adamw => "adamw", kiln_recipe::OptimKind::Adamw8bit => "adamw8bit" },
            "lr": o.lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay,
        }),
        adapter: recipe
            .adapter
            .as_ref()
            .map(|a| serde_json::to_value(a).expect("the adapter section serializes")),
        train: serde_json::json!({
            "activation_checkpointing": recipe.train.activation_checkpointing,
            "neftune_alpha": recipe.train.neftune_alpha,
            "clip_norm": recipe.train.clip_norm,
        }),
        steps: opts.steps,
        warmup: opts.warmup,
        step_time_s: step_time,
        tokens_per_s,
        flops_per_token,
        gflops,
        mfu: gflops / peak.gflops,
        peak,
        peak_rss_bytes: kiln_train::peak_resident_bytes(),
        device: gpu.and_then(gpu_name),
        peak_device_bytes: rec.peak_device_bytes,
        step_times_s: timed,
    };
    if let Some(bytes) = result.peak_device_bytes {
        eprintln!(
            "peak device memory {:.2} GiB on {}",
            bytes as f64 / f64::from(1u32 << 30),
            result.device.as_deref().unwrap_or("the GPU")
        );
    }
    eprintln!(
        "kiln {} {}: {:.0} tokens/s | {:.3} s/step | {:.1} MFLOP/token | {:.1} GFLOP/s | MFU {:.1}% of {:.0} GFLOP/s ({}) | peak RSS {}",
        result.family,
        result.backend,
        result.tokens_per_s,
        result.step_time_s,
        flops_per_token / 1e6,
        gflops,
        100.0 * result.mfu,
        result.peak.gflops,
        result.peak.basis,
        result
            .peak_rss_bytes
            .map_or("n/a".to_string(), |b| format!("{:.0} MB", b as f64 / 1e6)),
    );
    if recipe.model.family == ModelFamily::Moa {
        eprintln!(
            "note: moa computes all four paths and three experts for every token (the router zeroes the unselected ones); the FLOPs above count that work"
        );
    }
    let json = serde_json::to_string_pretty(&result).expect("result serializes");
    if let Some(path) = &opts.json {
        std::fs::write(path, &json).with_context(|| format!("writing `{}`", path.display()))?;
    }
    println!("{json}");
    Ok(())
}
