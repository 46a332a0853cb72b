//! Golden test: kiln renders and tokenizes chat rows exactly as `transformers`'
//! `apply_chat_template` does with the verbatim Qwen2.5-Instruct template and a Qwen2-style
//! byte-level BPE tokenizer. Regenerate the fixtures with
//! `.venv/bin/python scripts/make_chat_fixtures.py` (see its header).

use std::path::PathBuf;

use kiln_data::{HfTokenizer, Tokenizer, read_documents, tokenize_document};
use kiln_recipe::{Source, SourceFormat, TextSplit};

fn fixtures() -> PathBuf {
    manifest_dir().join("../../tests/fixtures/chat")
}

fn chat_source() -> Source {
    Source {
        name: "chat".to_string(),
        format: SourceFormat::Jsonl,
        path: fixtures().join("conversations.jsonl").display().to_string(),
        split: TextSplit::File,
        text_field: "text".to_string(),
        messages_field: Some("messages".to_string()),
        tools_field: "tools".to_string(),
        template: None,
        min_tokens: None,
        max_tokens: None,
        on_bad_row: Default::default(),
        on_exhausted: Default::default(),
        epochs: None,
    }
}

#[test]
fn rendering_and_token_ids_match_transformers() {
    let tok = HfTokenizer::from_path(&fixtures(), None, None).unwrap();
    let docs = read_documents(&chat_source(), 0).unwrap();
    let expected: Vec<serde_json::Value> =
        std::fs::read_to_string(fixtures().join("expected.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(docs.len(), expected.len());
    for (i, (doc, exp)) in docs.iter().zip(&expected).enumerate() {
        assert_eq!(
            doc.text,
            exp["text"].as_str().unwrap(),
            "row {i}: rendered text differs"
        );
        let want: Vec<u32> = exp["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenize_document(&tok, doc);
        assert_eq!(
            &got.ids[..got.ids.len() - 1],
            &want[..],
            "row {i}: token ids differ"
        );
        assert_eq!(*got.ids.last().unwrap(), tok.eos_id());
    }
}

#[test]
fn only_assistant_turns_and_their_im_end_are_trained() {
    let tok = HfTokenizer::from_path(&fixtures(), None, None).unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let docs = read_documents(&chat_source(), 0).unwrap();
    for (i, doc) in docs.iter().enumerate() {
        let t = tokenize_document(&tok, doc);
        let trained = t.trained.as_ref().unwrap();
        // Decode each run of trained tokens: each must be one assistant turn's text.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut prev = false;
        for (id, on) in t.ids.iter().zip(trained) {
            if *on {
                if !prev {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(*id);
            }
            prev = *on;
        }
        let spans: Vec<&str> = doc
            .trained
            .as_ref()
            .unwrap()
            .iter()
            .map(|r| &doc.text[r.clone()])
            .collect();
        assert_eq!(
            runs.len(),
            spans.len(),
            "row {i}: one trained run per assistant turn"
        );
        for (run, span) in runs.iter().zip(&spans) {
            assert_eq!(tok.decode(run), *span, "row {i}");
            assert_eq!(
                *run.last().unwrap(),
                im_end,
                "row {i}: the turn's <|im_end|> is trained"
            );
            assert!(!tok.decode(run).contains("<|im_start|>"), "row {i}");
        }
        assert!(
            !trained.last().unwrap(),
            "the appended end-of-text is not trained"
        );
    }
}

/// The package directory: cargo's run-time `CARGO_MANIFEST_DIR` (right even when the
/// build directory is shared by checkouts at other paths), else the compile-time one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
