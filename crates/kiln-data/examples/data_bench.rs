//! The data path's throughput and memory, for `scripts/bench-data.sh`.
//!
//!     cargo run -p kiln-data --example data_bench -- make DIR MEGABYTES
//!     cargo run -p kiln-data --example data_bench -- run RECIPE [WINDOWS]
//!
//! `make` writes a synthetic Parquet corpus (shards of about 64 MB, row groups of 4096
//! rows of made-up prose) of about MEGABYTES of text. `run` builds (or opens) the recipe's
//! token cache, timing read + tokenize + write, opens it again as a later run would, then
//! draws WINDOWS windows of phase 0 (read from the mapped cache and cut), and prints tokens
//! per second for each stage and the process's memory: peak resident, and anonymous (heap)
//! memory, which excludes the mapped cache pages the kernel can drop at will.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use kiln_data::{DataCursor, DataPipeline, SplitMix64};

fn status(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn make(dir: &Path, megabytes: usize) {
    const WORDS: [&str; 24] = [
        "the", "kiln", "fired", "slowly", "while", "a", "potter", "watched", "glaze", "melt",
        "into", "glass", "and", "clay", "turned", "hard", "as", "stone", "under", "heat", "of",
        "wood", "smoke", "rising",
    ];
    std::fs::create_dir_all(dir).expect("create corpus dir");
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
    let mut rng = SplitMix64::new(7);
    let target = megabytes * 1_000_000;
    let (mut written, mut shard) = (0usize, 0usize);
    while written < target {
        let path = dir.join(format!("part-{shard:05}.parquet"));
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(4096))
            .build();
        let file = std::fs::File::create(&path).expect("create shard");
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).expect("writer");
        let mut in_shard = 0;
        while in_shard < 64_000_000 && written < target {
            let rows: Vec<String> = (0..4096)
                .map(|_| {
                    let n = 40 + (rng.next_u64() % 300) as usize;
                    (0..n)
                        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let bytes: usize = rows.iter().map(String::len).sum();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(StringArray::from(rows)) as ArrayRef],
            )
            .expect("batch");
            w.write(&batch).expect("write");
            in_shard += bytes;
            written += bytes;
        }
        w.close().expect("close");
        shard += 1;
    }
    println!(
        "wrote {written} bytes of text in {shard} shards to {}",
        dir.display()
    );
}

fn run(recipe: &Path, windows: usize) {
    let loaded = kiln_recipe::load(recipe, &[]).expect("recipe");
    let r = &loaded.recipe;
    let t0 = Instant::now();
    let data = DataPipeline::with_log(r, 1 << 20, &mut |m| eprintln!("info: {m}")).expect("data");
    let first = t0.elapsed().as_secs_f64();
    let tokens: u64 = data.sources().iter().map(|s| s.cache().meta.tokens).sum();
    let built: f64 = data.sources().iter().map(|s| s.cache().meta.build_s).sum();
    let t1 = Instant::now();
    let again = DataPipeline::new(r, 1 << 20).expect("data");
    let reopen = t1.elapsed().as_secs_f64();
    let phase = &r.phases[0];
    let mut cursor: DataCursor = again.initial_cursor(r.run.seed);
    let batches = windows.div_ceil(phase.batch_size);
    let t2 = Instant::now();
    let mut drawn = 0u64;
    for _ in 0..batches {
        drawn += again
            .next_batch(0, &mut cursor)
            .map_or(0, |b| b.inputs.len() as u64);
    }
    let draw = t2.elapsed().as_secs_f64();
    println!(
        "corpus {tokens} tokens | cache build (read + tokenize + write) {:.1}s = {:.2}M tokens/s | first open {first:.1}s | reopen {:.3}s | windows: {} x {} = {drawn} tokens in {draw:.2}s = {:.2}M tokens/s | peak RSS {} MB, heap (RssAnon) now {} MB",
        built,
        tokens as f64 / built.max(1e-9) / 1e6,
        reopen,
        batches * phase.batch_size,
        phase.window,
        drawn as f64 / draw.max(1e-9) / 1e6,
        status("VmHWM:"),
        status("RssAnon:"),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("make") if args.len() == 3 => {
            make(Path::new(&args[1]), args[2].parse().expect("megabytes"));
        }
        Some("run") if args.len() >= 2 => run(
            Path::new(&args[1]),
            args.get(2).map_or(200_000, |w| w.parse().expect("windows")),
        ),
        _ => eprintln!("usage: data_bench make DIR MEGABYTES | data_bench run RECIPE [WINDOWS]"),
    }
}
