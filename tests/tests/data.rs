//! Parquet and Arrow sources through the CLI: shards with several row groups, a two-source
//! mixture that resumes exactly mid-row-group, column templates, the token cache reused by
//! a second run, and bad input (corrupt footer, missing column, wrong type, null, empty
//! shard) reported by file, row group, row and column, or skipped and counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use kiln_tests::*;

/// A sentence of made-up words, different for every `i`.
fn sentence(i: usize, words: usize) -> String {
    const SYL: [&str; 12] = [
        "ka", "lo", "mi", "ren", "tu", "sa", "ve", "no", "pi", "dra", "el", "os",
    ];
    (0..words)
        .map(|w| {
            let a = SYL[(i * 7 + w * 3) % SYL.len()];
            let b = SYL[(i + w * 5 + 1) % SYL.len()];
            format!("{a}{b}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `rows` string rows of `columns` to a Parquet file in row groups of `group` rows.
fn write_parquet(path: &Path, columns: &[(&str, Vec<Option<String>>)], group: usize) {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, _)| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|(_, v)| Arc::new(StringArray::from(v.clone())) as ArrayRef)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        .build();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Two sources of Parquet shards: `stories/` (3 shards, `text`) and `qa/` (2 shards,
/// `question` + `answer` joined by a template).
fn corpus(dir: &Path) {
    let stories = dir.join("stories");
    let qa = dir.join("qa");
    std::fs::create_dir_all(&stories).unwrap();
    std::fs::create_dir_all(&qa).unwrap();
    for shard in 0..3 {
        let rows: Vec<Option<String>> = (0..40)
            .map(|r| Some(sentence(shard * 100 + r, 12 + r % 9)))
            .collect();
        write_parquet(
            &stories.join(format!("part-{shard}.parquet")),
            &[("text", rows)],
            7,
        );
    }
    for shard in 0..2 {
        let q: Vec<Option<String>> = (0..30)
            .map(|r| Some(format!("what is {}?", sentence(shard * 50 + r, 3))))
            .collect();
        let a: Vec<Option<String>> = (0..30).map(|r| Some(sentence(shard * 77 + r, 6))).collect();
        write_parquet(
            &qa.join(format!("part-{shard}.parquet")),
            &[("question", q), ("answer", a)],
            9,
        );
    }
}

fn recipe(dir: &Path, extra_source_keys: &str) -> PathBuf {
    let path = dir.join("parquet.toml");
    std::fs::write(
        &path,
        format!(
            r#"# Two Parquet sources in a mixture.
[run]
name = "pq"
out_dir = "{out}"
[model]
family = "qwen2"
[model.qwen2]
vocab_size = 260
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 128
[data]
eval_holdout = 0.05
[[data.sources]]
name = "stories"
format = "parquet"
path = "{dir}/stories"
{extra_source_keys}
[[data.sources]]
name = "qa"
format = "parquet"
path = "{dir}/qa/part-*.parquet"
template = "Q: {{question}}\nA: {{answer}}"
[[phases]]
sources = {{ stories = 2.0, qa = 1.0 }}
batch_size = 4
window = 48
steps = 12
[optim]
lr = 3e-3
[train]
checkpoint_every = 5
eval_every = 0
eval_tokens = 256
"#,
            out = dir.join("runs").display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    path
}

#[test]
fn parquet_mixture_resumes_exactly_mid_row_group_and_reuses_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let r = recipe(dir.path(), "");
    let rs = r.to_str().unwrap();
    let straight = run(&["train", rs, "--set", "run.name=straight"]);
    assert_ok(&straight);
    // The first run tokenizes both sources into the cache...
    let log = stderr(&straight);
    assert!(
        log.contains("source `stories`: tokenized 120 rows into 120 documents"),
        "{log}"
    );
    assert!(log.contains("source `qa`: tokenized 60 rows"), "{log}");
    // ...and every later run reads it.
    let first = run(&["train", rs, "--set", "run.name=split", "--stop-after", "7"]);
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    assert!(!stderr(&first).contains("tokenized"), "{}", stderr(&first));
    let split = dir.path().join("runs/split");
    // Step 7 of 4-window batches over 7- and 9-row groups stops inside a row group.
    assert_ok(&run(&["resume", split.to_str().unwrap()]));
    let straight_losses = losses(&dir.path().join("runs/straight"));
    assert_eq!(straight_losses.len(), 12);
    assert_eq!(
        straight_losses,
        losses(&split),
        "resumed run saw other windows"
    );
    // Metrics log the tokens each source has given so far.
    let rows = metrics(&split);
    let last = rows.iter().rev().find(|r| r["kind"] == "train").unwrap();
    let per_source = &last["source_trained_tokens"];
    assert_eq!(
        per_source["stories"].as_u64().unwrap() + per_source["qa"].as_u64().unwrap(),
        last["trained_tokens"].as_u64().unwrap(),
        "{last}"
    );
    // The mixture drew from both sources.
    let cursor: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(split.join("checkpoints/step-00000012/state.json")).unwrap(),
    )
    .unwrap();
    for name in ["stories", "qa"] {
        assert!(
            cursor["cursor"]["counts"][name]["windows"]
                .as_u64()
                .unwrap()
                > 0,
            "{cursor}"
        );
    }
}

#[test]
fn data_inspect_shows_rows_lengths_windowing_and_masked_samples() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let r = recipe(dir.path(), "");
    let out = run(&["data", "inspect", r.to_str().unwrap(), "--samples", "1"]);
    assert_ok(&out);
    let text = stdout(&out);
    for want in [
        "source `stories` (parquet, 3 files, data.sources[0])",
        "rows 120 | documents 120 (6 held out)",
        "source `qa` (parquet, 2 files, data.sources[1])",
        "document length (tokens): min ",
        "phases[0] belt x 48: one pass = ",
        "part-0.parquet: row group 0, row 0):",
        "| Q: what is ",
    ] {
        assert!(text.contains(want), "`{want}` not in:\n{text}");
    }
    // Chat sources show what is trained.
    let chat = run(&[
        "data",
        "inspect",
        "recipes/smoke/qwen2-qlora-tiny.toml",
        "--set",
        &format!(
            "data.cache_dir={:?}",
            dir.path().join("c").display().to_string()
        ),
    ]);
    assert_ok(&chat);
    assert!(stdout(&chat).contains("    | ⟦"), "{}", stdout(&chat));
}

#[test]
fn arrow_ipc_files_and_streams_are_sources() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from((0..20).collect::<Vec<i64>>())) as ArrayRef,
            Arc::new(StringArray::from(
                (0..20).map(|i| sentence(i, 10)).collect::<Vec<_>>(),
            )) as ArrayRef,
        ],
    )
    .unwrap();
    let shards = dir.path().join("arrow");
    std::fs::create_dir_all(&shards).unwrap();
    let mut f = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(shards.join("a.arrow")).unwrap(),
        &schema,
    )
    .unwrap();
    f.write(&batch).unwrap();
    f.finish().unwrap();
    // Hugging Face `datasets` cache files are in the stream format.
    let mut s = arrow_ipc::writer::StreamWriter::try_new(
        std::fs::File::create(shards.join("b.arrow")).unwrap(),
        &schema,
    )
    .unwrap();
    s.write(&batch).unwrap();
    s.finish().unwrap();
    let r = dir.path().join("arrow.toml");
    std::fs::write(
        &r,
        std::fs::read_to_string(recipe(dir.path(), ""))
            .unwrap()
            .replace(
                &format!(
                    "format = \"parquet\"\npath = \"{}/stories\"",
                    dir.path().display()
                ),
                &format!("format = \"arrow\"\npath = \"{}\"", shards.display()),
            )
            .replace("stories = 2.0, qa = 1.0", "stories = 1.0"),
    )
    .unwrap();
    let out = run(&["train", r.to_str().unwrap(), "--set", "phases[0].steps=2"]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("source `stories`: tokenized 40 rows into 40 documents"),
        "{}",
        stderr(&out)
    );
}

/// `kiln train`'s stderr for a one-source recipe over `stories/` as it now stands.
fn train_stories(dir: &Path, keys: &str) -> std::process::Output {
    let r = recipe(dir, keys);
    run(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "phases[0].sources={ stories = 1.0 }",
        "--set",
        "phases[0].steps=1",
        "--overwrite",
    ])
}

#[test]
fn bad_parquet_input_names_file_row_group_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let stories = dir.path().join("stories");
    let expect_err = |keys: &str, parts: &[&str]| {
        let out = train_stories(dir.path(), keys);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        for p in parts {
            assert!(err.contains(p), "`{p}` not in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };

    // A null in the text column, in the second row group.
    let mut rows: Vec<Option<String>> = (0..20).map(|i| Some(sentence(i, 8))).collect();
    rows[9] = None;
    write_parquet(&stories.join("part-1.parquet"), &[("text", rows)], 7);
    expect_err(
        "",
        &[
            "part-1.parquet: row group 1, row 2",
            "column `text`: null",
            "on_bad_row",
        ],
    );
    // With on_bad_row = "skip" the row is dropped and counted.
    let out = train_stories(dir.path(), "on_bad_row = \"skip\"");
    assert_ok(&out);
    assert!(
        stderr(&out).contains("1 bad rows skipped (first: "),
        "{}",
        stderr(&out)
    );
    let data_row = metrics(&dir.path().join("runs/pq"))
        .into_iter()
        .find(|r| r["kind"] == "data" && r["source"] == "stories")
        .expect("a data row in metrics.jsonl");
    assert_eq!(data_row["skipped_rows"], 1, "{data_row}");

    // A missing column lists the columns the file has.
    expect_err(
        "text_field = \"body\"",
        &["part-0.parquet", "no column `body` (columns: `text`)"],
    );
    // A column of the wrong type.
    let schema = Arc::new(Schema::new(vec![Field::new(
        "text",
        DataType::Int64,
        false,
    )]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(stories.join("part-1.parquet")).unwrap(),
        schema,
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    expect_err(
        "",
        &[
            "part-1.parquet",
            "column `text` is Int64, expected a string column",
        ],
    );
    // An empty shard.
    write_parquet(&stories.join("part-1.parquet"), &[("text", Vec::new())], 7);
    expect_err("", &["part-1.parquet", "holds no rows"]);
    let out = train_stories(dir.path(), "on_bad_row = \"skip\"");
    assert_ok(&out);
    assert!(
        stderr(&out).contains("1 empty shards skipped"),
        "{}",
        stderr(&out)
    );
    // A corrupted footer.
    let bytes = std::fs::read(stories.join("part-2.parquet")).unwrap();
    std::fs::write(stories.join("part-1.parquet"), &bytes[..bytes.len() - 9]).unwrap();
    expect_err("", &["part-1.parquet", "not a readable Parquet file"]);
}

#[test]
fn a_phase_whose_sources_all_stop_ends_early() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let r = recipe(dir.path(), "on_exhausted = \"stop\"");
    let out = run(&[
        "train",
        r.to_str().unwrap(),
        "--set",
        "phases[0].sources={ stories = 1.0 }",
        "--set",
        "phases[0].steps=500",
    ]);
    assert_ok(&out);
    assert!(
        stderr(&out).contains("every source has stopped (on_exhausted = \"stop\") after step"),
        "{}",
        stderr(&out)
    );
    // One pass over the 114 training stories, cut into 48-token windows, 4 per step.
    let l = losses(&dir.path().join("runs/pq"));
    assert!(l.len() > 20 && l.len() < 500, "{}", l.len());
}

#[test]
fn resume_refuses_changed_data_but_not_touched_files() {
    let dir = tempfile::tempdir().unwrap();
    corpus(dir.path());
    let r = recipe(dir.path(), "");
    let first = run(&["train", r.to_str().unwrap(), "--stop-after", "3"]);
    assert_eq!(first.status.code(), Some(75), "{}", stderr(&first));
    let run_dir = dir.path().join("runs/pq");
    // Rewriting a shard with the same rows only changes its modification time: the cache
    // is rebuilt under a new key, its content is the same, and the run resumes.
    let shard = dir.path().join("stories/part-1.parquet");
    let rows: Vec<Option<String>> = (0..40)
        .map(|r| Some(sentence(100 + r, 12 + r % 9)))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_parquet(&shard, &[("text", rows.clone())], 7);
    let again = run(&["resume", run_dir.to_str().unwrap(), "--stop-after", "1"]);
    assert_eq!(again.status.code(), Some(75), "{}", stderr(&again));
    assert!(stderr(&again).contains("tokenized"), "{}", stderr(&again));
    // Changing a row is refused.
    let mut changed = rows;
    changed[3] = Some("a different story".to_string());
    write_parquet(&shard, &[("text", changed)], 7);
    let refused = run(&["resume", run_dir.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("source `stories`: its documents changed since the checkpoint"),
        "{}",
        stderr(&refused)
    );
}
