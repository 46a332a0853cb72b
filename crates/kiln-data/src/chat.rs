//! The Qwen2.5 ChatML chat template with tools, rendered exactly as the `chat_template` of
//! Qwen2.5-Instruct's `tokenizer_config.json` does in `transformers` (Jinja), plus the
//! character spans of the assistant turns that the loss is computed on.
//!
//! Rules followed from the template: a default system prompt when the first message is not
//! a system message; with tools, the system turn carries the `# Tools` block with one
//! `tojson` line per tool; an assistant turn with `tool_calls` renders its content (if any)
//! and one `<tool_call>` block per call; consecutive `tool` messages are grouped into one
//! `user` turn of `<tool_response>` blocks. `tojson` is Python's
//! `json.dumps(x, ensure_ascii=False)`: `", "` and `": "` separators, keys in their given
//! order, non-ASCII kept.
//!
//! Trained spans: each assistant turn from after `<|im_start|>assistant\n` through its
//! `<|im_end|>` (the newline after it is not trained).

use std::fmt::Write as _;
use std::ops::Range;

use serde::Deserialize;
use serde_json::Value;

const DEFAULT_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text content (may be absent for an assistant turn that only calls tools).
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls of an assistant turn.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A tool call: `{"type": "function", "function": {"name", "arguments"}}` or the bare
/// `{"name", "arguments"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolCall {
    /// The OpenAI-style wrapper.
    #[serde(default)]
    pub function: Option<FunctionCall>,
    /// Bare form: the function name.
    #[serde(default)]
    pub name: Option<String>,
    /// Bare form: the arguments.
    #[serde(default)]
    pub arguments: Option<Value>,
}

impl ToolCall {
    /// The function name and its arguments object, from either form (JSON-encoded string
    /// arguments decoded), as the chat template renders them; `None` for a call without a
    /// name or with arguments that are not an object.
    pub fn name_and_arguments(&self) -> Option<(String, Value)> {
        call_parts(self, 0, 1).ok()
    }
}

/// The called function.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments: a JSON object (a JSON-encoded string is decoded first).
    pub arguments: Value,
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The full text.
    pub text: String,
    /// Byte ranges of `text` that are trained on (assistant turns).
    pub trained: Vec<Range<usize>>,
}

/// Renders `value` as Python's `json.dumps(value, ensure_ascii=False)`.
pub fn tojson(value: &Value) -> String {
    let mut out = String::new();
    write_json(value, &mut out);
    out
}

fn write_json(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&python_number(n)),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json_string(k, out);
                out.push_str(": ");
                write_json(v, out);
            }
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` of a JSON number: integers as written, floats always with a `.` or an
/// exponent (`1.0`, `0.5`, `1e-05`, `1e+16`).
fn python_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust writes `1e-5`; Python writes `1e-05`.
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let s = format!("{f}");
    if s.contains('.') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// Errors in a chat row.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatError {
    /// No messages.
    #[error("`messages` is empty")]
    Empty,
    /// A role the template does not know.
    #[error("message {index}: unknown role `{role}` (expected system, user, assistant or tool)")]
    Role {
        /// Message index.
        index: usize,
        /// The role.
        role: String,
    },
    /// A message needs text content.
    #[error("message {index} ({role}): missing `content`")]
    Content {
        /// Message index.
        index: usize,
        /// The role.
        role: String,
    },
    /// A tool call lacks a name.
    #[error("message {index}: tool call {call} has no function name")]
    ToolName {
        /// Message index.
        index: usize,
        /// Call index.
        call: usize,
    },
    /// Tool-call arguments that are neither an object nor a JSON-encoded object.
    #[error(
        "message {index}: tool call {call}: `arguments` must be a JSON object, found `{found}`"
    )]
    Arguments {
        /// Message index.
        index: usize,
        /// Call index.
        call: usize,
        /// What was found.
        found: String,
    },
}

fn call_parts(call: &ToolCall, index: usize, n: usize) -> Result<(String, Value), ChatError> {
    let (name, args) = match &call.function {
        Some(f) => (Some(f.name.clone()), Some(f.arguments.clone())),
        None => (call.name.clone(), call.arguments.clone()),
    };
    let name = name.ok_or(ChatError::ToolName { index, call: n })?;
    let args = match args.unwrap_or(Value::Object(Default::default())) {
        // Arguments must be an object; a JSON-encoded string would render double-encoded.
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(ChatError::Arguments {
                    index,
                    call: n,
                    found: s,
                });
            }
        },
        v @ Value::Object(_) => v,
        other => {
            return Err(ChatError::Arguments {
                index,
                call: n,
                found: other.to_string(),
            });
        }
    };
    Ok((name, args))
}

/// Renders a conversation with the Qwen2.5 template (no generation prompt unless
/// `add_generation_prompt`).
pub fn render(
    messages: &[Message],
    tools: &[Value],
    add_generation_prompt: bool,
) -> Result<Rendered, ChatError> {
    let first = messages.first().ok_or(ChatError::Empty)?;
    let mut text = String::new();
    let mut trained = Vec::new();
    let first_is_system = first.role == "system";
    let content = |i: usize, m: &Message| -> Result<String, ChatError> {
        m.content.clone().ok_or_else(|| ChatError::Content {
            index: i,
            role: m.role.clone(),
        })
    };
    if !tools.is_empty() {
        text.push_str("<|im_start|>system\n");
        if first_is_system {
            text.push_str(&content(0, first)?);
        } else {
            text.push_str(DEFAULT_SYSTEM);
        }
        text.push_str("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>");
        for tool in tools {
            text.push('\n');
            text.push_str(&tojson(tool));
        }
        text.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
    } else if first_is_system {
        text.push_str("<|im_start|>system\n");
        text.push_str(&content(0, first)?);
        text.push_str("<|im_end|>\n");
    } else {
        text.push_str("<|im_start|>system\n");
        text.push_str(DEFAULT_SYSTEM);
        text.push_str("<|im_end|>\n");
    }
    for (i, m) in messages.iter().enumerate() {
        let calls = m.tool_calls.as_deref().unwrap_or(&[]);
        match m.role.as_str() {
            "system" if i == 0 => {}
            "user" | "system" => {
                text.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role,
                    content(i, m)?
                ));
            }
            "assistant" => {
                text.push_str("<|im_start|>assistant");
                let start = text.len() + 1;
                if calls.is_empty() {
                    text.push('\n');
                    text.push_str(&content(i, m)?);
                } else {
                    if let Some(c) = m.content.as_deref().filter(|c| !c.is_empty()) {
                        text.push('\n');
                        text.push_str(c);
                    }
                    for (n, call) in calls.iter().enumerate() {
                        let (name, args) = call_parts(call, i, n)?;
                        text.push_str("\n<tool_call>\n{\"name\": \"");
                        text.push_str(&name);
                        text.push_str("\", \"arguments\": ");
                        text.push_str(&tojson(&args));
                        text.push_str("}\n</tool_call>");
                    }
                }
                text.push_str("<|im_end|>");
                trained.push(start.min(text.len())..text.len());
                text.push('\n');
            }
            "tool" => {
                if i == 0 || messages[i - 1].role != "tool" {
                    text.push_str("<|im_start|>user");
                }
                text.push_str("\n<tool_response>\n");
                text.push_str(&content(i, m)?);
                text.push_str("\n</tool_response>");
                if i + 1 == messages.len() || messages[i + 1].role != "tool" {
                    text.push_str("<|im_end|>\n");
                }
            }
            other => {
                return Err(ChatError::Role {
                    index: i,
                    role: other.to_string(),
                });
            }
        }
    }
    if add_generation_prompt {
        text.push_str("<|im_start|>assistant\n");
    }
    Ok(Rendered { text, trained })
}

/// A tool call parsed from generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToolCall {
    /// Function name.
    pub name: String,
    /// Arguments.
    pub arguments: Value,
}

/// Extracts the `<tool_call>` blocks of an assistant reply. Each block is parsed
/// separately: a malformed one yields an error message (with the block) instead of
/// aborting the others.
pub fn parse_tool_calls(reply: &str) -> Vec<Result<ParsedToolCall, String>> {
    let mut out = Vec::new();
    let mut rest = reply;
    while let Some(start) = rest.find("<tool_call>") {
        let after = &rest[start + "<tool_call>".len()..];
        let (body, next) = match after.find("</tool_call>") {
            Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
            None => (after, ""),
        };
        let closed = !next.is_empty() || after.contains("</tool_call>");
        out.push(parse_call(body.trim(), closed));
        rest = next;
    }
    out
}

fn parse_call(body: &str, closed: bool) -> Result<ParsedToolCall, String> {
    if !closed {
        return Err(format!("unterminated <tool_call> block: `{body}`"));
    }
    let v: Value = serde_json::from_str(body)
        .map_err(|e| format!("invalid JSON in <tool_call>: {e}: `{body}`"))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("<tool_call> without a string `name`: `{body}`"))?
        .to_string();
    let arguments = v
        .get("arguments")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    Ok(ParsedToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python() {
        let v: Value = serde_json::from_str(r#"{"b": 1, "a": [1.0, 0.5, 1e-5, "Zürich\n\"q\""], "n": null, "t": true, "big": 1e20}"#).unwrap();
        assert_eq!(
            tojson(&v),
            r#"{"b": 1, "a": [1.0, 0.5, 1e-05, "Zürich\n\"q\""], "n": null, "t": true, "big": 1e+20}"#
        );
    }

    #[test]
    fn assistant_turns_are_the_trained_spans() {
        let msgs: Vec<Message> = serde_json::from_str(
            r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]"#,
        )
        .unwrap();
        let r = render(&msgs, &[], false).unwrap();
        assert!(r.text.starts_with("<|im_start|>system\nYou are Qwen"));
        assert_eq!(r.trained.len(), 1);
        assert_eq!(&r.text[r.trained[0].clone()], "hello<|im_end|>");
    }

    #[test]
    fn tool_calls_parse_and_malformed_ones_are_reported() {
        let reply = "ok\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": f}\n</tool_call><tool_call>{\"name\": \"g\"";
        let calls = parse_tool_calls(reply);
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].as_ref().unwrap().name, "f");
        assert!(calls[1].as_ref().unwrap_err().contains("invalid JSON"));
        assert!(calls[2].as_ref().unwrap_err().contains("unterminated"));
    }

    #[test]
    fn string_arguments_are_decoded_not_double_encoded() {
        let msgs: Vec<Message> = serde_json::from_str(
            r#"[{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]}]"#,
        )
        .unwrap();
        let r = render(&msgs, &[], false).unwrap();
        assert!(
            r.text
                .contains("{\"name\": \"f\", \"arguments\": {\"a\": 1}}"),
            "{}",
            r.text
        );
        let bad: Vec<Message> = serde_json::from_str(
            r#"[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}]"#,
        )
        .unwrap();
        assert!(matches!(
            render(&bad, &[], false),
            Err(ChatError::Arguments { .. })
        ));
    }
}
