//! `kiln tokenizer train`: a Qwen2-style byte-level BPE tokenizer trained on a recipe's
//! sources.

use std::path::Path;

use anyhow::Result;

/// Trains a tokenizer of `vocab_size` ids on the sources of `recipe` (with `set` applied)
/// and writes its tokenizer.json to `out`; a tokenizer trained on part of the data is not
/// left behind.
pub fn train(recipe: &Path, set: &[String], vocab_size: usize, out: &Path) -> Result<()> {
    let loaded = kiln_recipe::load(recipe, set)?;
    // The sources stream through the trainer: no corpus is held in memory.
    let (texts, reader) = kiln_data::stream_texts(loaded.recipe.data.sources.clone());
    let trained = kiln_data::bpe::train_bpe(texts, vocab_size, out);
    let counts = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the source reader thread panicked"))?;
    let counts = match counts {
        Ok(c) => c,
        Err(e) => {
            // Trained on part of the data: do not leave that tokenizer behind.
            let _ = std::fs::remove_file(out);
            return Err(e.into());
        }
    };
    let tok = trained?;
    for (name, n) in &counts {
        eprintln!("source `{name}`: {n} documents");
    }
    eprintln!(
        "trained a byte-level BPE tokenizer of {} ids on {} documents",
        tok.get_vocab_size(true),
        counts.iter().map(|(_, n)| n).sum::<u64>()
    );
    println!("{}", out.display());
    Ok(())
}
