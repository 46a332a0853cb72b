//! `kiln data inspect`: what a recipe's data looks like to the trainer.

use anyhow::Result;

use kiln_data::{DataPipeline, Docs, PreparedSource, Tokenizer};
use kiln_models::ModelSpec;
use kiln_recipe::Recipe;

/// Prints the report to stdout (cache builds are reported on stderr).
pub fn inspect(recipe: &Recipe, samples: usize) -> Result<()> {
    let vocab = ModelSpec::from_recipe(recipe)?.vocab_size();
    let data = DataPipeline::with_log(recipe, vocab, &mut |m| eprintln!("info: {m}"))?;
    for (i, (src, spec)) in data.sources().iter().zip(&recipe.data.sources).enumerate() {
        let meta = &src.cache().meta;
        println!(
            "source `{}` ({}, {} file{}, data.sources[{i}])",
            src.name,
            spec.format.as_str(),
            meta.read.files,
            if meta.read.files == 1 { "" } else { "s" }
        );
        println!(
            "  rows {} | documents {} ({} held out) | tokens {} ({} trained as targets) | cache {}",
            meta.read.rows,
            meta.documents,
            src.heldout.len(),
            meta.tokens,
            meta.trained_tokens,
            src.cache().dir.display()
        );
        if meta.read.skipped + meta.read.empty_files + meta.filtered_short + meta.filtered_long > 0
        {
            println!(
                "  dropped: {} bad rows (on_bad_row = \"skip\"){}, {} empty shards, {} documents under min_tokens, {} over max_tokens",
                meta.read.skipped,
                meta.read
                    .first_skip
                    .as_deref()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default(),
                meta.read.empty_files,
                meta.filtered_short,
                meta.filtered_long
            );
        }
        println!("  document length (tokens): {}", histogram(src));
        for (p, phase) in recipe.phases.iter().enumerate() {
            if !phase.sources.contains_key(&src.name) {
                continue;
            }
            for (name, c) in data.windowing_report(p) {
                if name != src.name {
                    continue;
                }
                println!(
                    "  phases[{p}] {} x {}: one pass = {} windows | trained {} | dropped {} ({} trained spans cut) | padding {} | overlap {}",
                    phase.windowing.as_str(),
                    phase.window,
                    c.windows,
                    c.trained,
                    c.dropped,
                    c.turns_cut,
                    c.padded,
                    c.overlap
                );
            }
        }
        for k in 0..samples.min(src.train.len()) {
            println!("  sample {} ({}):", k + 1, src.train.origin(k));
            let text = render(src, k, data.tokenizer());
            for line in text.lines().take(24) {
                println!("    | {line}");
            }
        }
        println!();
    }
    Ok(())
}

/// Counts of documents by length, in power-of-two buckets.
fn histogram(src: &PreparedSource) -> String {
    let mut buckets = std::collections::BTreeMap::<u32, u64>::new();
    let (mut min, mut max, mut sum) = (usize::MAX, 0, 0u64);
    for i in 0..src.train.len() {
        let n = src.train.doc_len(i);
        min = min.min(n);
        max = max.max(n);
        sum += n as u64;
        *buckets
            .entry(n.max(1).next_power_of_two().trailing_zeros())
            .or_default() += 1;
    }
    let docs = src.train.len().max(1) as u64;
    let bars: Vec<String> = buckets
        .iter()
        .map(|(b, n)| format!("≤{}: {n}", 1u64 << b))
        .collect();
    format!(
        "min {min}, mean {}, max {max} | {}",
        sum / docs,
        bars.join(", ")
    )
}

/// A training document decoded, with trained text between `⟦` and `⟧` when only part of
/// it is trained (chat sources).
fn render(src: &PreparedSource, k: usize, tokenizer: &dyn Tokenizer) -> String {
    let doc = src.train.doc(k);
    let Some(flags) = &doc.trained else {
        return tokenizer.decode(&doc.ids);
    };
    let mut out = String::new();
    let mut start = 0;
    while start < doc.ids.len() {
        let t = flags[start];
        let end = (start..doc.ids.len())
            .find(|&j| flags[j] != t)
            .unwrap_or(doc.ids.len());
        let text = tokenizer.decode(&doc.ids[start..end]);
        if t {
            out.push_str(&format!("⟦{text}⟧"));
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    out
}
