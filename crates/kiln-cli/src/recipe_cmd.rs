//! `kiln recipe schema` and `kiln recipe new`.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where the committed schema lives, relative to the repository root.
pub const SCHEMA_PATH: &str = "schemas/recipe.schema.json";

/// Starter recipes: kiln's smoke recipes, which train on the data shipped with kiln.
const STARTERS: [(&str, &str, &str); 4] = [
    (
        "qwen2",
        "recipes/smoke/qwen2-tiny.toml",
        include_str!("../../../recipes/smoke/qwen2-tiny.toml"),
    ),
    (
        "qlora",
        "recipes/smoke/qwen2-qlora-tiny.toml",
        include_str!("../../../recipes/smoke/qwen2-qlora-tiny.toml"),
    ),
    (
        "moa",
        "recipes/smoke/moa-tiny.toml",
        include_str!("../../../recipes/smoke/moa-tiny.toml"),
    ),
    (
        "convgpt",
        "recipes/smoke/convgpt-tiny.toml",
        include_str!("../../../recipes/smoke/convgpt-tiny.toml"),
    ),
];

/// The families `kiln recipe new` knows.
pub fn families() -> Vec<&'static str> {
    STARTERS.iter().map(|s| s.0).collect()
}

/// Writes the JSON Schema to `out`, or prints it.
pub fn schema(out: Option<&Path>) -> Result<()> {
    let text = kiln_recipe::json_schema();
    match out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing `{}`", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{text}"),
    }
    Ok(())
}

/// `to` relative to the directory `from` (both absolute, normalized), e.g. `../../schemas/x`.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<Component<'_>> = from.components().collect();
    let b: Vec<Component<'_>> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c);
    }
    rel
}

/// Writes a commented starter recipe for `family` to `out`.
pub fn new(family: &str, out: &Path, force: bool) -> Result<()> {
    let Some((_, source, text)) = STARTERS.iter().find(|s| s.0 == family) else {
        bail!(
            "unknown family `{family}`: choose one of {}",
            families().join(", ")
        );
    };
    if out.exists() && !force {
        bail!(
            "`{}` exists: pick another name, or pass --force to replace it",
            out.display()
        );
    }
    let stem = out
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .context("the output needs a file name, e.g. my-run.toml")?;
    let out_abs = std::path::absolute(out)?;
    let dir = out_abs.parent().unwrap_or(Path::new("/"));
    // The schema directive, when the schema is at hand (running inside a kiln checkout).
    let schema = std::path::absolute(SCHEMA_PATH)
        .ok()
        .filter(|p| p.is_file())
        .map(|p| relative(dir, &p));
    let mut header = String::new();
    match &schema {
        Some(rel) => header.push_str(&format!("#:schema {}\n", rel.display())),
        None => header.push_str(
            "# (For key completion and checking in an editor with a TOML language server, put\n\
             # `kiln recipe schema --out recipe.schema.json` beside this file and add the line\n\
             # `#:schema ./recipe.schema.json` at the very top.)\n",
        ),
    }
    header.push_str(&format!(
        "# Starter `{family}` recipe, written by `kiln recipe new --family {family}`. It has the\n\
         # settings of kiln's smoke recipe\n\
         #   {source}\n\
         # which trains on data shipped with kiln in about a minute on a CPU. Point\n\
         # [[data.sources]] at your own data, size the model under [model] and set the phases.\n\
         # Every key is described in kiln's README and in its recipe schema.\n\
         #\n\
         #   kiln inspect {name}     # checks it and shows what it will do\n\
         #   kiln train {name}\n\
         #\n\
         # What the smoke recipe says about itself:\n#\n",
        name = out.display()
    ));
    // The smoke recipe's own opening comment, then its body with the run named after the file.
    let mut body = String::new();
    let mut in_header = true;
    let mut renamed = false;
    for line in text.lines() {
        if in_header && line.starts_with('#') {
            if !line.starts_with("#:schema") {
                header.push_str(line);
                header.push('\n');
            }
            continue;
        }
        in_header = false;
        if !renamed && line.starts_with("name = ") {
            body.push_str(&format!("name = \"{stem}\"\n"));
            renamed = true;
            continue;
        }
        body.push_str(line);
        body.push('\n');
    }
    let recipe = format!("{header}{body}");
    // It must validate: a starter that does not would be a bug here, not the user's.
    kiln_recipe::from_str(&recipe, out, &[])
        .with_context(|| format!("the `{family}` starter does not validate"))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating `{}`", parent.display()))?;
    }
    std::fs::write(out, recipe).with_context(|| format!("writing `{}`", out.display()))?;
    eprintln!(
        "wrote {} ({family}, from {source}); check it with `kiln inspect {}`",
        out.display(),
        out.display()
    );
    Ok(())
}
