//! Measures kiln's greedy decoding speed on a Hugging Face Qwen2 directory, on the ndarray
//! and flex CPU backends.
//!
//! ```text
//! cargo run -p kiln-models --example generate_speed -- DIR [PROMPT_LEN] [NEW_TOKENS] [RUNS]
//! ```
//!
//! Defaults: a 16-token prompt, 64 new tokens, 5 timed runs after one warm-up run. Prints
//! the median prompt and decode rates; `scripts/bench_generate.py` measures `transformers`
//! the same way. The dev profile is enough: Burn and every other dependency are built with
//! `opt-level = 3` there (root `Cargo.toml`).

use std::path::Path;

use burn::backend::{Flex, NdArray};

use kiln_models::{GenerateOptions, Generation, KilnBackend, Model, generate};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench<B: KilnBackend>(backend: &str, dir: &Path, prompt_len: usize, new: usize, runs: usize) {
    let device = Default::default();
    let model = Model::<B>::from_hf_dir(dir, &device)
        .unwrap_or_else(|e| panic!("cannot load `{}`: {e}", dir.display()));
    let vocab = model.vocab_size();
    // The same prompt as scripts/bench_generate.py.
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| ((7 * i + 3) % vocab) as u32)
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: new,
        ..Default::default()
    };
    let run = || -> Generation { generate(&model, &prompt, &opts).expect("valid prompt") };
    run();
    let gens: Vec<Generation> = (0..runs).map(|_| run()).collect();
    assert!(gens.iter().all(|g| g.tokens.len() == new));
    let prompt_tps = median(gens.iter().map(Generation::prompt_tokens_per_s).collect());
    let decode_tps = median(gens.iter().map(Generation::decode_tokens_per_s).collect());
    let total_tps = median(
        gens.iter()
            .map(|g| new as f64 / (g.prompt_time_s + g.decode_time_s))
            .collect(),
    );
    println!(
        "kiln {backend:8} prompt {prompt_len} tokens: {prompt_tps:9.1} tok/s | decode {new} \
         tokens: {decode_tps:7.1} tok/s | end to end {total_tps:7.1} new tok/s (median of {runs})"
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: generate_speed DIR [PROMPT_LEN] [NEW_TOKENS] [RUNS]");
        std::process::exit(2);
    };
    let num = |i: usize, default: usize| {
        args.get(i).map_or(default, |s| {
            s.parse()
                .unwrap_or_else(|_| panic!("argument {i}: `{s}` is not a count"))
        })
    };
    let (prompt_len, new, runs) = (num(1, 16), num(2, 64), num(3, 5));
    let dir = Path::new(dir);
    bench::<NdArray>("ndarray", dir, prompt_len, new, runs);
    bench::<Flex>("flex", dir, prompt_len, new, runs);
}
