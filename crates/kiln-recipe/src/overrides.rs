//! `--set key=value` overrides on the raw TOML table, and key-level diffs of two recipes.

use std::collections::BTreeMap;

use crate::RecipeError;

/// One step of a dotted key: a table key or an array index.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Splits `phases[1].window` or `phases.1.window` into segments.
fn parse_key(spec: &str, key: &str) -> Result<Vec<Segment>, RecipeError> {
    let bad = |message: String| RecipeError::Override {
        spec: spec.to_string(),
        message,
    };
    let mut out = Vec::new();
    for part in key.split('.') {
        if part.is_empty() {
            return Err(bad(format!("empty segment in key `{key}`")));
        }
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            match name.parse::<usize>() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => out.push(Segment::Key(name.to_string())),
            }
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| bad(format!("unclosed `[` in key `{key}`")))?;
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| bad(format!("`{}` is not an array index", &rest[1..close])))?;
            out.push(Segment::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(bad(format!("unexpected `{rest}` in key `{key}`")));
            }
        }
    }
    Ok(out)
}

/// Parses the right-hand side of an override: a TOML value if it is one (`3`, `1e-4`,
/// `true`, `"x"`, `[1, 2]`, `{ a = 1 }`), otherwise the text as a string (`flex`).
fn parse_value(text: &str) -> toml::Value {
    // TOML reads bare `nan` and `inf` as floats; no recipe key wants those, but a run may
    // well be named `nan`.
    if matches!(text, "nan" | "+nan" | "-nan" | "inf" | "+inf" | "-inf") {
        return toml::Value::String(text.to_string());
    }
    let doc = format!("v = {text}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.to_string())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

/// Applies one `key=value` override to a recipe table.
///
/// Missing intermediate tables are created (typed parsing then rejects keys that do not
/// exist in the schema); array indices must exist.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), RecipeError> {
    let bad = |message: String| RecipeError::Override {
        spec: spec.to_string(),
        message,
    };
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected `key=value`".to_string()))?;
    let segments = parse_key(spec, key.trim())?;
    if !matches!(segments.first(), Some(Segment::Key(_))) {
        return Err(bad("a key must start with a section name".to_string()));
    }
    // A phase has one length: setting `steps`, `tokens` or `epochs` replaces the others.
    if let [Segment::Key(p), Segment::Index(i), Segment::Key(k)] = segments.as_slice()
        && p == "phases"
        && PHASE_LENGTHS.contains(&k.as_str())
        && let Some(toml::Value::Table(phase)) = table
            .get_mut("phases")
            .and_then(|v| v.as_array_mut())
            .and_then(|a| a.get_mut(*i))
    {
        phase.retain(|key, _| key == k || !PHASE_LENGTHS.contains(&key));
    }
    let mut root = toml::Value::Table(std::mem::take(table));
    let result = set_path(
        &mut root,
        &segments,
        parse_value(value.trim()),
        String::new(),
    );
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    result.map_err(bad)
}

/// The keys that give a phase's length; a phase has exactly one.
const PHASE_LENGTHS: [&str; 3] = ["steps", "tokens", "epochs"];

/// Sets `value` at `segments` below `node`; `walked` is the path so far, for errors.
fn set_path(
    node: &mut toml::Value,
    segments: &[Segment],
    value: toml::Value,
    walked: String,
) -> Result<(), String> {
    let Some((seg, rest)) = segments.split_first() else {
        *node = value;
        return Ok(());
    };
    let mut here = walked.clone();
    push_seg(&mut here, seg);
    let child = match (node, seg) {
        (toml::Value::Table(t), Segment::Key(k)) => t
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new())),
        (toml::Value::Array(a), Segment::Index(i)) => {
            let len = a.len();
            a.get_mut(*i)
                .ok_or_else(|| format!("`{walked}` has {len} entries, no index {i}"))?
        }
        (other, seg) => {
            return Err(format!(
                "`{walked}` is a {}, cannot index it with `{}`",
                other.type_str(),
                seg_str(seg)
            ));
        }
    };
    set_path(child, rest, value, here)
}

fn seg_str(seg: &Segment) -> String {
    match seg {
        Segment::Key(k) => k.clone(),
        Segment::Index(i) => format!("[{i}]"),
    }
}

fn push_seg(path: &mut String, seg: &Segment) {
    match seg {
        Segment::Key(k) => {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
        }
        Segment::Index(i) => path.push_str(&format!("[{i}]")),
    }
}

/// Flattens a TOML value into `dotted.key[i] -> rendered value`.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::Array(a) if a.iter().any(|v| v.is_table()) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Keys whose values differ between two recipes, as `key: old -> new` lines.
pub fn diff_keys(old: &crate::Recipe, new: &crate::Recipe) -> Vec<String> {
    let to_value = |r: &crate::Recipe| {
        toml::Value::try_from(r).expect("a recipe always converts to a TOML value")
    };
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    flatten("", &to_value(old), &mut a);
    flatten("", &to_value(new), &mut b);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => None,
            (x, y) => Some(format!(
                "{k}: {} -> {}",
                x.map_or("(absent)", String::as_str),
                y.map_or("(absent)", String::as_str)
            )),
        })
        .collect()
}

/// Keys that each process of a data-parallel run sets for itself: the processes of one run
/// differ in them, and a process may resume with other values than it started with.
const PER_PROCESS_KEYS: [&str; 4] = [
    "distributed.rank",
    "distributed.host",
    "distributed.data_port",
    "distributed.orchestrator",
];

/// What `resume` calls a change of recipe: the `diff_keys` lines between the recipe a
/// checkpoint was written with and the one a run continues with, less the keys each process
/// of a data-parallel run sets for itself.
pub fn resume_changes(saved: &crate::Recipe, resumed: &crate::Recipe) -> Vec<String> {
    diff_keys(saved, resumed)
        .into_iter()
        .filter(|k| !PER_PROCESS_KEYS.iter().any(|p| k.starts_with(p)))
        .collect()
}
