//! Golden test: kiln's greedy decoding against `transformers`' `generate`.
//!
//! `tests/fixtures/qwen2/<name>/generate.json` holds, for two prompts of different lengths,
//! the 24 tokens that `transformers` generated greedily (eager attention, float32, no
//! end-of-sequence token) from the tiny random-init model in the same directory, and the gap
//! between its two largest logits at each step. Regenerate them with
//! `.venv/bin/python scripts/make_generate_fixtures.py` (see its header).
//!
//! Each fixture is loaded through the public API (`Model::from_hf_dir`) and decoded with
//! [`kiln_models::generate`] (the prompt in one call, then one cached call per token), on
//! ndarray and on flex. The tokens must match exactly. On a mismatch the failure says
//! whether the first differing step is a genuine near-tie (kiln's logits for the two
//! candidates within 1e-5) or a real bug.

use std::path::PathBuf;

use burn::backend::{Flex, NdArray};
use burn::prelude::*;

use kiln_models::{GenerateOptions, KilnBackend, Model, generate};

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("../../tests/fixtures/qwen2").join(name)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// kiln's logits after `seq`, from one uncached forward pass.
fn last_logits<B: KilnBackend>(model: &Model<B>, seq: &[u32], device: &B::Device) -> Vec<f32> {
    let t = seq.len();
    let data: Vec<i64> = seq.iter().map(|&x| i64::from(x)).collect();
    let logits = model
        .forward(Tensor::from_data(TensorData::new(data, [1, t]), device))
        .logits; // [1, t, vocab]
    let v = model.vocab_size();
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()
}

fn check<B: KilnBackend>(name: &str, device: &B::Device) {
    let dir = fixture(name);
    let text = std::fs::read_to_string(dir.join("generate.json"))
        .unwrap_or_else(|e| panic!("{name}: generate.json: {e}"));
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max_new_tokens = usize::try_from(fx["max_new_tokens"].as_u64().unwrap()).unwrap();
    let model = Model::<B>::from_hf_dir(&dir, device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let opts = GenerateOptions {
        max_new_tokens,
        temperature: 0.0,
        ..Default::default()
    };
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 2, "{name}: only {} prompts", cases.len());
    for (k, case) in cases.iter().enumerate() {
        let prompt = ids(&case["prompt"]);
        let want = ids(&case["tokens"]);
        assert_eq!(want.len(), max_new_tokens, "{name}: prompt {k}");
        let got = generate(&model, &prompt, &opts)
            .unwrap_or_else(|e| panic!("{name}: prompt {k}: {e}"))
            .tokens;
        let Some(step) = got.iter().zip(&want).position(|(g, w)| g != w) else {
            assert_eq!(got.len(), want.len(), "{name}: prompt {k}");
            continue;
        };
        // Tell a near-tie from a bug: kiln's own logits for both candidates at that step.
        let seq: Vec<u32> = prompt.iter().chain(&want[..step]).copied().collect();
        let logits = last_logits(&model, &seq, device);
        let (g, w) = (got[step] as usize, want[step] as usize);
        let gap = logits[g] - logits[w];
        let hf_margin = case["margins"][step].as_f64().unwrap();
        let verdict = if gap.abs() < 1e-5 {
            "a genuine near-tie"
        } else {
            "not a near-tie: a real bug"
        };
        panic!(
            "{name}: prompt {k} ({} tokens): first difference at new token {step}: kiln chose \
             {g}, transformers {w}; kiln's uncached forward gives them logits differing by \
             {gap:e}, transformers' top-2 margin was {hf_margin:e}: {verdict}\n  \
             kiln:         {got:?}\n  transformers: {want:?}",
            prompt.len()
        );
    }
    eprintln!(
        "{name}: {} prompts x {max_new_tokens} greedy tokens match transformers",
        cases.len()
    );
}

fn all<B: KilnBackend>() {
    let device = Default::default();
    for name in ["tied_gqa1", "untied_gqa4", "bf16_gqa2", "sharded_tied"] {
        check::<B>(name, &device);
    }
}

#[test]
fn greedy_generation_matches_transformers_on_ndarray() {
    all::<NdArray>();
}

#[test]
fn greedy_generation_matches_transformers_on_flex() {
    all::<Flex>();
}

/// The package directory: cargo's run-time `CARGO_MANIFEST_DIR` (right even when the
/// build directory is shared by checkouts at other paths), else the compile-time one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
