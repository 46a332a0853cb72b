//! `kiln eval RUN_DIR --tool-calls FILE.jsonl`: judge a chat model by what it generates.
//!
//! Each row of the file is a conversation (`messages`, optional `tools`) whose last message
//! is the assistant turn the model should produce. The messages before it are rendered with
//! the chat template and the model replies greedily. A row whose expected turn calls tools
//! is scored on format (every `<tool_call>` block parses, and there is at least one), tool
//! names (the same names in the same order) and arguments (the same JSON, numbers compared
//! by value); a row whose expected turn is text is scored on exact match and on a
//! normalized match (case, punctuation and spacing ignored).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

use kiln_data::Tokenizer;
use kiln_data::chat::{Message, parse_tool_calls, render};
use kiln_models::generate::{GenerateOptions, generate};
use kiln_models::{KilnAutodiffBackend, Model};
use kiln_recipe::Recipe;
use kiln_train::RunDir;
use kiln_train::checkpoint::{Checkpoint, find_checkpoint};

use crate::backend::{Job, dispatch};

/// What `kiln eval --tool-calls` was asked to do.
pub struct ToolEvalRequest {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Which checkpoint.
    pub checkpoint: String,
    /// The test rows (chat JSONL).
    pub file: PathBuf,
    /// The most new tokens per reply.
    pub max_new_tokens: usize,
    /// Where to write the JSON result (default: `RUN_DIR/eval/tool-calls-<checkpoint>.json`).
    pub json: Option<PathBuf>,
}

/// One test row: the prompt and the expected turn.
struct Row {
    line: usize,
    tools: Vec<Value>,
    prompt: Vec<Message>,
    expected: Expected,
}

enum Expected {
    Calls(Vec<(String, Value)>),
    Text(String),
}

/// How one row scored.
#[derive(Debug, Serialize)]
struct RowResult {
    line: usize,
    kind: &'static str,
    /// The last user or tool message before the expected turn.
    prompt: String,
    expected: Value,
    reply: String,
    /// Tool-call rows: every block parses and there is one at least.
    format_valid: Option<bool>,
    /// Tool-call rows: the same tool names in the same order.
    name_match: Option<bool>,
    /// Tool-call rows: names and arguments equal.
    arguments_match: Option<bool>,
    /// Text rows.
    exact_match: Option<bool>,
    /// Text rows: equal after lower-casing and dropping punctuation and extra spaces.
    normalized_match: Option<bool>,
}

/// A count of rows passing one check.
#[derive(Debug, Serialize)]
struct Rate {
    passed: usize,
    of: usize,
    rate: f64,
}

impl Rate {
    fn of(results: &[&RowResult], check: impl Fn(&RowResult) -> Option<bool>) -> Self {
        let passed = results.iter().filter(|r| check(r) == Some(true)).count();
        let of = results.len();
        Self {
            passed,
            of,
            rate: if of == 0 {
                0.0
            } else {
                passed as f64 / of as f64
            },
        }
    }

    fn line(&self, label: &str) -> String {
        format!(
            "    {label:<22} {:>4}/{:<4} {:>6.1}%",
            self.passed,
            self.of,
            100.0 * self.rate
        )
    }
}

/// The whole result, as written to JSON.
#[derive(Debug, Serialize)]
struct Report {
    run: String,
    checkpoint: String,
    step: u64,
    file: String,
    rows: usize,
    tool_call_rows: usize,
    format_valid: Rate,
    tool_name_accuracy: Rate,
    arguments_exact_match: Rate,
    text_rows: usize,
    exact_match: Rate,
    normalized_match: Rate,
    results: Vec<RowResult>,
}

/// Reads the test file; every problem names the file and line.
fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading `{}`", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{n}", path.display());
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let tools = match value.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(t)) => t.clone(),
            Some(_) => bail!("{}: `tools` must be an array of tool definitions", at()),
        };
        let messages: Vec<Message> = serde_json::from_value(
            value
                .get("messages")
                .cloned()
                .with_context(|| format!("{}: no `messages` field", at()))?,
        )
        .with_context(|| format!("{}: `messages` is not a list of chat messages", at()))?;
        let Some((last, prompt)) = messages.split_last() else {
            bail!("{}: `messages` is empty", at());
        };
        if last.role != "assistant" || prompt.is_empty() {
            bail!(
                "{}: the last message must be the expected assistant turn, after at least one message",
                at()
            );
        }
        let expected = match &last.tool_calls {
            Some(calls) if !calls.is_empty() => Expected::Calls(
                calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        c.name_and_arguments().with_context(|| {
                            format!(
                                "{}: expected tool call {} has no name or non-object arguments",
                                at(),
                                j + 1
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => Expected::Text(last.content.clone().with_context(|| {
                format!(
                    "{}: the expected turn has no content and no tool calls",
                    at()
                )
            })?),
        };
        rows.push(Row {
            line: n,
            tools,
            prompt: prompt.to_vec(),
            expected,
        });
    }
    if rows.is_empty() {
        bail!("`{}` has no test rows", path.display());
    }
    Ok(rows)
}

/// Lower case, punctuation as spaces, single spaces.
fn normalize(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// JSON equality with numbers compared by value (`3` equals `3.0`).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn score(row: &Row, reply: &str) -> RowResult {
    let prompt = row
        .prompt
        .last()
        .and_then(|m| m.content.clone())
        .unwrap_or_default();
    let mut r = RowResult {
        line: row.line,
        kind: "text",
        prompt,
        expected: Value::Null,
        reply: reply.to_string(),
        format_valid: None,
        name_match: None,
        arguments_match: None,
        exact_match: None,
        normalized_match: None,
    };
    match &row.expected {
        Expected::Calls(expected) => {
            r.kind = "tool_call";
            r.expected = expected
                .iter()
                .map(|(n, a)| serde_json::json!({"name": n, "arguments": a}))
                .collect();
            let parsed = parse_tool_calls(reply);
            let calls: Vec<_> = parsed.iter().filter_map(|c| c.as_ref().ok()).collect();
            let valid = !parsed.is_empty() && calls.len() == parsed.len();
            let names = valid
                && calls.len() == expected.len()
                && calls.iter().zip(expected).all(|(c, (n, _))| c.name == *n);
            let arguments = names
                && calls
                    .iter()
                    .zip(expected)
                    .all(|(c, (_, a))| same_json(&c.arguments, a));
            r.format_valid = Some(valid);
            r.name_match = Some(names);
            r.arguments_match = Some(arguments);
        }
        Expected::Text(expected) => {
            r.expected = Value::String(expected.clone());
            r.exact_match = Some(reply.trim() == expected.trim());
            r.normalized_match = Some(normalize(reply) == normalize(expected));
        }
    }
    r
}

struct ReplyJob<'a> {
    recipe: &'a Recipe,
    checkpoint: Checkpoint,
    prompts: &'a [Vec<u32>],
    options: &'a GenerateOptions,
}

impl Job for ReplyJob<'_> {
    type Output = Vec<kiln_models::generate::Generation>;

    fn run<B: KilnAutodiffBackend>(self, device: B::Device) -> Result<Self::Output> {
        let model: Model<B::InnerBackend> =
            Model::restore(self.recipe, self.checkpoint.model, &device)?;
        let mut out = Vec::with_capacity(self.prompts.len());
        for (i, prompt) in self.prompts.iter().enumerate() {
            out.push(generate(&model, prompt, self.options)?);
            if (i + 1) % 10 == 0 || i + 1 == self.prompts.len() {
                eprintln!("generated {}/{} replies", i + 1, self.prompts.len());
            }
        }
        Ok(out)
    }
}

/// Runs the evaluation: prints the table on stdout and writes the JSON result.
pub fn run(req: ToolEvalRequest) -> Result<()> {
    let run = RunDir::open(&req.run_dir)?;
    let recipe = run.load_recipe(&[])?.recipe;
    let tokenizer: Box<dyn Tokenizer> = kiln_data::tokenizer_for(&recipe)?;
    let rows = read_rows(&req.file)?;
    let prompts: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let text = render(&r.prompt, &r.tools, true)
                .with_context(|| format!("{}:{}", req.file.display(), r.line))?
                .text;
            Ok(tokenizer.encode(&text))
        })
        .collect::<Result<_>>()?;
    let options = GenerateOptions {
        max_new_tokens: req.max_new_tokens,
        stop_ids: crate::generate::stop_ids(tokenizer.as_ref()),
        ..GenerateOptions::default()
    };
    let checkpoint = find_checkpoint(&req.run_dir, &req.checkpoint)?;
    let step = checkpoint.state.step;
    let ckpt_name = kiln_train::checkpoint::step_dir_name(step);
    let generations = dispatch(
        &recipe,
        ReplyJob {
            recipe: &recipe,
            checkpoint,
            prompts: &prompts,
            options: &options,
        },
    )?;
    let results: Vec<RowResult> = rows
        .iter()
        .zip(&generations)
        .map(|(row, g)| {
            let mut ids = g.tokens.clone();
            if g.stopped_on.is_some() {
                ids.pop();
            }
            score(row, &tokenizer.decode(&ids))
        })
        .collect();
    let calls: Vec<&RowResult> = results.iter().filter(|r| r.kind == "tool_call").collect();
    let texts: Vec<&RowResult> = results.iter().filter(|r| r.kind == "text").collect();
    let report = Report {
        run: req.run_dir.display().to_string(),
        checkpoint: ckpt_name.clone(),
        step,
        file: req.file.display().to_string(),
        rows: results.len(),
        tool_call_rows: calls.len(),
        format_valid: Rate::of(&calls, |r| r.format_valid),
        tool_name_accuracy: Rate::of(&calls, |r| r.name_match),
        arguments_exact_match: Rate::of(&calls, |r| r.arguments_match),
        text_rows: texts.len(),
        exact_match: Rate::of(&texts, |r| r.exact_match),
        normalized_match: Rate::of(&texts, |r| r.normalized_match),
        results: Vec::new(),
    };
    println!(
        "tool-call eval of {} ({ckpt_name}) on {}: {} rows, greedy, at most {} new tokens",
        report.run, report.file, report.rows, req.max_new_tokens
    );
    println!("  tool-call rows {:>20}", report.tool_call_rows);
    println!("{}", report.format_valid.line("format valid"));
    println!("{}", report.tool_name_accuracy.line("tool name correct"));
    println!(
        "{}",
        report.arguments_exact_match.line("arguments exact match")
    );
    println!("  text-answer rows {:>18}", report.text_rows);
    println!("{}", report.exact_match.line("exact match"));
    println!("{}", report.normalized_match.line("normalized match"));
    let report = Report { results, ..report };
    let path = req.json.unwrap_or_else(|| {
        req.run_dir
            .join("eval")
            .join(format!("tool-calls-{ckpt_name}.json"))
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing `{}`", path.display()))?;
    eprintln!("wrote {} (every row's reply and scores)", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(expected: Expected) -> Row {
        Row {
            line: 1,
            tools: Vec::new(),
            prompt: vec![Message {
                role: "user".to_string(),
                content: Some("Weather in Oslo?".to_string()),
                tool_calls: None,
            }],
            expected,
        }
    }

    #[test]
    fn tool_calls_score_format_then_name_then_arguments() {
        let expected = || {
            row(Expected::Calls(vec![(
                "get_weather".to_string(),
                serde_json::json!({"city": "Oslo"}),
            )]))
        };
        let call = |body: &str| format!("<tool_call>\n{body}\n</tool_call>");
        let checks = |reply: &str| {
            let r = score(&expected(), reply);
            (r.format_valid, r.name_match, r.arguments_match)
        };
        let all = |v, n, a| (Some(v), Some(n), Some(a));
        assert_eq!(
            checks(&call(
                r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#
            )),
            all(true, true, true)
        );
        assert_eq!(
            checks(&call(
                r#"{"name": "get_weather", "arguments": {"city": "Lima"}}"#
            )),
            all(true, true, false)
        );
        assert_eq!(
            checks(&call(
                r#"{"name": "set_timer", "arguments": {"city": "Oslo"}}"#
            )),
            all(true, false, false)
        );
        // Broken JSON, an unterminated block, plain text, or a second (extra) call.
        assert_eq!(
            checks(&call(r#"{"name": "get_weather", "#)),
            all(false, false, false)
        );
        assert_eq!(checks("<tool_call>\n{}"), all(false, false, false));
        assert_eq!(checks("It is sunny."), all(false, false, false));
        let twice = call(r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#).repeat(2);
        assert_eq!(checks(&twice), all(true, false, false));
    }

    #[test]
    fn text_answers_score_exact_and_normalized() {
        let r = score(
            &row(Expected::Text("It is 5 °C in Oslo.".to_string())),
            " it is 5 °c in oslo ",
        );
        assert_eq!(
            (r.exact_match, r.normalized_match),
            (Some(false), Some(true))
        );
        assert_eq!(r.format_valid, None);
        let r = score(&row(Expected::Text("Done.".to_string())), "Done.\n");
        assert_eq!(
            (r.exact_match, r.normalized_match),
            (Some(true), Some(true))
        );
    }

    #[test]
    fn normalization_and_json_equality() {
        assert_eq!(
            normalize("  It is 5 °C,  and RAINY in Oslo. "),
            "it is 5 c and rainy in oslo"
        );
        assert!(same_json(
            &serde_json::json!({"value": 3, "to": "feet"}),
            &serde_json::json!({"to": "feet", "value": 3.0})
        ));
        assert!(!same_json(
            &serde_json::json!({"value": 3}),
            &serde_json::json!({"value": 3, "extra": 1})
        ));
    }
}
