//! Loading a recipe for the commands that train, measure or inspect it: what validation
//! questioned without refusing goes to stderr, and phase lengths in epochs become steps.

use std::path::Path;

use anyhow::Result;
use kiln_recipe::LoadedRecipe;

/// Loads, overrides and validates `path`, prints its warnings and, with `resolve_epochs`,
/// turns its phase lengths in epochs into steps (which reads the data).
pub fn load(path: &Path, set: &[String], resolve_epochs: bool) -> Result<LoadedRecipe> {
    let mut loaded = kiln_recipe::load(path, set)?;
    print_warnings(&loaded);
    if resolve_epochs {
        self::resolve_epochs(&mut loaded)?;
    }
    Ok(loaded)
}

/// Turns phase lengths given in `epochs` into steps (reading the data), says so, and checks
/// the recipe again now that its step count is known.
fn resolve_epochs(loaded: &mut LoadedRecipe) -> Result<()> {
    let vocab = kiln_models::ModelSpec::from_recipe(&loaded.recipe)?.vocab_size();
    let epochs: Vec<Option<f64>> = loaded.recipe.phases.iter().map(|p| p.epochs).collect();
    for (i, windows, steps) in kiln_data::DataPipeline::resolve_epochs(&mut loaded.recipe, vocab)? {
        eprintln!(
            "phases[{i}]: {} epochs = {windows} windows = {steps} steps",
            epochs[i].unwrap_or_default()
        );
    }
    loaded
        .recipe
        .validate(&loaded.path)
        .map_err(kiln_recipe::RecipeError::Invalid)?;
    Ok(())
}

/// Prints what validation questioned without refusing, to stderr.
pub fn print_warnings(loaded: &LoadedRecipe) {
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
}
