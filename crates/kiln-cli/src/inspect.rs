//! `kiln inspect`: what a recipe will do, before it does it.

use anyhow::Result;

use kiln_data::DataPipeline;
use kiln_models::ModelSpec;
use kiln_recipe::LoadedRecipe;

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// `1.23M`, `4.5K`: counts the way the tables print them.
pub(crate) fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Prints the inspection report to stdout.
pub fn inspect(loaded: &LoadedRecipe, read_data: bool) -> Result<()> {
    let r = &loaded.recipe;
    let spec = ModelSpec::from_recipe(r)?;
    let params = spec.num_params();
    println!(
        "recipe      {} (sha256 {})",
        loaded.path.display(),
        &r.hash()[..16]
    );
    println!(
        "run         {} -> {}/{}",
        r.run.name, r.run.out_dir, r.run.name
    );
    println!("backend     {} on {}", r.run.backend.as_str(), r.run.device);
    println!(
        "model       {}: {} parameters ({} in matrix products per token)",
        r.model.family.as_str(),
        human_count(params),
        human_count(spec.matmul_params())
    );
    if let ModelSpec::Moa(c) = &spec {
        println!("  parameter budget");
        for comp in c.components() {
            println!(
                "    {:<40} {:>10} {:>6.1}%",
                comp.name,
                human_count(comp.params),
                100.0 * comp.params as f64 / params.max(1) as f64
            );
        }
        let (lo, hi) = c.active_params();
        println!(
            "  active per token: {}..{} ({:.1}%..{:.1}%: embedding, norms, routers and the top-{} of 4 paths and of 3 HyperFFN experts)",
            human_count(lo),
            human_count(hi),
            100.0 * lo as f64 / params.max(1) as f64,
            100.0 * hi as f64 / params.max(1) as f64,
            c.top_k
        );
    }
    if let ModelSpec::Convgpt(c) = &spec {
        let w = r.phases.iter().map(|p| p.window).max().unwrap_or(1);
        let (keys, summaries) = c.memory_reads_per_token(w);
        println!(
            "  per token: causal 1D conv of {} taps, causal {k}x{k} conv over a {side}x{side} Hilbert grid ({} positions), {} memory layers each reading {keys} keys ({} of {} chunks of {}, plus its own) and scoring {summaries} chunk summaries at window {w}",
            c.conv_kernel,
            4usize.pow(c.grid_order),
            c.memory_layers(),
            c.memory_top_k.min(summaries.saturating_sub(1)),
            summaries,
            c.memory_chunk,
            k = c.conv2d_kernel,
            side = 1usize << c.grid_order,
        );
    }
    let steps = r.phase_steps();
    if r.phases.iter().any(|p| p.epochs.is_some()) {
        println!("phases      lengths in epochs resolve into steps once the data is read");
    } else {
        println!("phases      {} steps in all", r.total_steps());
    }
    let mut first = 1;
    let mut peak_activation = 0u64;
    for (i, (p, n)) in r.phases.iter().zip(&steps).enumerate() {
        let last = first + n - 1;
        let per_step = r.tokens_per_step(p);
        let mix: Vec<String> = p.sources.iter().map(|(s, w)| format!("{s}={w}")).collect();
        let span = match p.epochs {
            Some(e) => format!("{e} epochs"),
            None => format!("steps {first}..={last}"),
        };
        println!(
            "  [{i}] {:<12} {span} | batch {} x window {} x accum {} = {} tokens/step | {} | lr_scale {} | {} GFLOP/step | mix {}",
            p.display_name(i),
            p.batch_size,
            p.window,
            r.train.grad_accum,
            per_step,
            p.windowing.as_str(),
            p.lr_scale,
            (spec.flops_per_token(p.window) * per_step as f64 / 1e9).round(),
            mix.join(", ")
        );
        let tokens = (p.batch_size * p.window) as u64;
        // With head chunks, one chunk's logits are alive instead of every token's.
        let logits_saved = match r.train.head_chunk_tokens {
            Some(rows) => tokens.saturating_sub(rows as u64),
            None => 0,
        } * kiln_models::logits_bytes_per_token(spec.vocab_size());
        peak_activation = peak_activation.max(
            spec.activation_bytes_per_token(p.window, r.train.activation_checkpointing) * tokens
                - logits_saved,
        );
        first = last + 1;
    }
    // What the optimizer trains and what it keeps per trained parameter (moments: two f32,
    // or for 8-bit AdamW two bytes plus block statistics).
    let moment_bytes = match r.optim.kind {
        kiln_recipe::OptimKind::Adamw8bit => 2.0 + 8.0 / 256.0,
        _ => 8.0,
    };
    let (weights, trained) = match &r.adapter {
        None => (params as f64 * 4.0, params as f64),
        Some(a) => {
            let targeted: Vec<[usize; 2]> = spec
                .projections()
                .into_iter()
                .filter(|(name, _)| a.targets.iter().any(|t| t == name))
                .map(|(_, d)| d)
                .collect();
            let base: f64 = targeted.iter().map(|[i, o]| (i * o) as f64).sum();
            let adapters: f64 = targeted
                .iter()
                .map(|[i, o]| (a.rank * (i + o)) as f64)
                .sum();
            // NF4 with double-quantized absmax: 0.5 + 1/64 + 4/16384 bytes per weight.
            let per_base = if a.kind == kiln_recipe::AdapterKind::Qlora {
                0.5 + 1.0 / 64.0 + 4.0 / 16384.0
            } else {
                4.0
            };
            let rest = params as f64 - base;
            (rest * 4.0 + base * per_base + adapters * 4.0, adapters)
        }
    };
    let (grads, moments) = (trained * 4.0, trained * moment_bytes);
    println!(
        "memory      ~{} total (estimate): weights {}, gradients {}, optimizer state {}, activations {} (largest micro-batch, f32, {})",
        human_bytes(weights + grads + moments + peak_activation as f64),
        human_bytes(weights),
        human_bytes(grads),
        human_bytes(moments),
        human_bytes(peak_activation as f64),
        match (r.train.activation_checkpointing, r.train.head_chunk_tokens) {
            (true, None) => "activation checkpointing".to_string(),
            (false, None) => "no activation checkpointing".to_string(),
            (true, Some(n)) => format!("activation checkpointing, head in chunks of {n} tokens"),
            (false, Some(n)) =>
                format!("no activation checkpointing, head in chunks of {n} tokens"),
        }
    );
    if read_data {
        let data = DataPipeline::new(r, spec.vocab_size())?;
        println!("data");
        for s in data.sources() {
            println!(
                "  {:<12} {} documents ({} held out), {} training tokens",
                s.name,
                s.train.len() + s.heldout.len(),
                s.heldout.len(),
                s.train_tokens()
            );
        }
        for (i, p) in r.phases.iter().enumerate() {
            for (name, c) in data.windowing_report(i) {
                println!(
                    "  [{i}] {name}: one pass = {} windows | trained {} | dropped {} ({} trained spans cut) | padding {} | overlap {}",
                    c.windows, c.trained, c.dropped, c.turns_cut, c.padded, c.overlap
                );
            }
            let _ = p;
        }
    }
    println!("\n# resolved recipe\n{}", r.to_toml());
    Ok(())
}
