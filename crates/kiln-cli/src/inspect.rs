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

fn human_count(n: u64) -> String {
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
    let steps = r.phase_steps();
    println!("phases      {} steps in all", r.total_steps());
    let mut first = 1;
    let mut peak_activation = 0u64;
    for (i, (p, n)) in r.phases.iter().zip(&steps).enumerate() {
        let last = first + n - 1;
        let per_step = r.tokens_per_step(p);
        let mix: Vec<String> = p.sources.iter().map(|(s, w)| format!("{s}={w}")).collect();
        println!(
            "  [{i}] {:<12} steps {first}..={last} | batch {} x window {} x accum {} = {} tokens/step | {} | lr_scale {} | {} GFLOP/step | mix {}",
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
        peak_activation = peak_activation
            .max(spec.activation_bytes_per_token(p.window) * (p.batch_size * p.window) as u64);
        first = last + 1;
    }
    let weights = params as f64 * 4.0;
    println!(
        "memory      ~{} total (estimate): weights {}, gradients {}, AdamW moments {}, activations {} (largest micro-batch, f32, no checkpointing)",
        human_bytes(weights * 4.0 + peak_activation as f64),
        human_bytes(weights),
        human_bytes(weights),
        human_bytes(weights * 2.0),
        human_bytes(peak_activation as f64)
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
