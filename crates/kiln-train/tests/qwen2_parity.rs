//! Golden tests: kiln's Qwen2 against Hugging Face `transformers`.
//!
//! The fixtures in `tests/fixtures/qwen2/<name>/` are tiny random-init `Qwen2ForCausalLM`
//! saved with `save_pretrained` (tied and untied heads, GQA ratios 1, 2 and 4, a bf16
//! checkpoint, a sharded one) with the logits, loss and gradients transformers computed.
//! Regenerate them with `.venv/bin/python scripts/make_qwen2_fixtures.py` (see its header).
//!
//! Each test loads the directory through the public API (`Model::from_hf_dir`), then
//! checks, on ndarray and on flex: logits (with a left-padded row and its attention mask)
//! within 1e-4, the loss of one training step within 1e-5, and the gradients of several
//! parameters within 1e-5.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::AutodiffModule;
use burn::prelude::*;

use kiln_data::Batch;
use kiln_models::{KilnAutodiffBackend, Model};
use kiln_train::loss::{input_tensor, masked_nll};
use kiln_train::optim::GradAccumulator;

fn fixture(name: &str) -> PathBuf {
    manifest_dir().join("../../tests/fixtures/qwen2").join(name)
}

/// `expected.safetensors` as (shape, f64 values), whatever the stored dtype.
fn expected(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `hf_logits.safetensors` written by a fixture script: `(batch, seq, input ids, logits)`.
fn hf_logits(dir: &Path) -> (usize, usize, Vec<i64>, Vec<f64>) {
    let bytes = std::fs::read(dir.join("hf_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids_view = st.tensor("input_ids").unwrap();
    let (b, t) = (ids_view.shape()[0], ids_view.shape()[1]);
    let ids = ids_view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    (b, t, ids, logits)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Transposes a row-major `[rows, cols]` matrix.
fn transpose(v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = v[i * cols + j];
        }
    }
    out
}

fn check<B: KilnAutodiffBackend>(name: &str, device: B::Device) {
    let dir = fixture(name);
    let exp = expected(&dir);
    let model = Model::<B>::from_hf_dir(&dir, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ids_shape, ids) = &exp["input_ids"];
    let (b, t) = (ids_shape[0], ids_shape[1]);
    let (_, mask) = &exp["attention_mask"];
    let (logits_shape, want_logits) = &exp["logits"];
    let v = logits_shape[2];

    // Logits, with row 1 left-padded and masked.
    let ids_i: Vec<i64> = ids.iter().map(|x| *x as i64).collect();
    let input =
        Tensor::<B::InnerBackend, 2, Int>::from_data(TensorData::new(ids_i, [b, t]), &device);
    let pad: Vec<bool> = mask.iter().map(|m| *m == 0.0).collect();
    let pad = Tensor::<B::InnerBackend, 2, Bool>::from_data(TensorData::new(pad, [b, t]), &device);
    let got = to_vec(
        model
            .valid()
            .forward_masked(input, Some(pad))
            .expect("qwen2 masks any padding")
            .logits,
    );
    let mut worst: f64 = 0.0;
    for (pos, m) in mask.iter().enumerate() {
        if *m == 1.0 {
            let range = pos * v..(pos + 1) * v;
            let d = max_abs_diff(&got[range.clone()], &want_logits[range]);
            if std::env::var("KILN_DEBUG").is_ok() {
                eprintln!("{name} pos {pos}: {d:e}");
            }
            worst = worst.max(d);
        }
    }
    assert!(worst < 1e-4, "{name}: logits differ by {worst:e}");
    eprintln!("{name}: logits max abs diff {worst:.2e}");

    // One training step on row 0: loss and gradients.
    let row: Vec<u32> = ids[..t].iter().map(|x| *x as u32).collect();
    let batch = Batch {
        batch_size: 1,
        window: t - 1,
        inputs: row[..t - 1].to_vec(),
        targets: row[1..].to_vec(),
        mask: vec![1.0; t - 1],
    };
    let out = model.forward(input_tensor::<B>(&batch, &device));
    let (nll, _) = masked_nll(out.logits, &batch, &device);
    let loss = nll.div_scalar((t - 1) as f64);
    let got_loss = to_vec(loss.clone())[0];
    let want_loss = exp["loss"].1[0];
    assert!(
        (got_loss - want_loss).abs() < 1e-5,
        "{name}: loss {got_loss} vs {want_loss}"
    );
    eprintln!(
        "{name}: loss {got_loss:.7} vs transformers {want_loss:.7} (diff {:.1e})",
        (got_loss - want_loss).abs()
    );
    let mut acc = GradAccumulator::<B::InnerBackend>::default();
    acc.accumulate::<B, _>(&model, loss.backward());
    let grads = acc.take();
    let mut checked = 0;
    for (key, (shape, want)) in &exp {
        let Some(param) = key.strip_prefix("grad.") else {
            continue;
        };
        let got = to_vec(
            grads
                .get(param)
                .unwrap_or_else(|| panic!("{name}: no gradient for {param}"))
                .clone(),
        );
        // Linear weights are [out, in] in transformers and [in, out] in Burn.
        let want = if shape.len() == 2 && param != "model.embed_tokens.weight" {
            transpose(want, shape[0], shape[1])
        } else {
            want.clone()
        };
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "{name}: gradient of {param} differs by {diff:e}"
        );
        eprintln!("{name}: grad {param} max abs diff {diff:.1e}");
        checked += 1;
    }
    assert!(checked >= 5, "{name}: only {checked} gradients checked");
}

fn all<B: KilnAutodiffBackend>(device: B::Device) {
    for name in ["tied_gqa1", "untied_gqa4", "bf16_gqa2", "sharded_tied"] {
        check::<B>(name, device.clone());
    }
}

#[test]
fn qwen2_matches_transformers_on_ndarray() {
    all::<Autodiff<NdArray>>(Default::default());
}

#[test]
fn qwen2_matches_transformers_on_flex() {
    all::<Autodiff<Flex>>(Default::default());
}

/// kiln trained and exported `tests/fixtures/qwen2/roundtrip`; transformers loaded that
/// export and wrote the logits it computes (`scripts/make_roundtrip_fixture.sh`). kiln must
/// compute the same logits from the same files: transformers reads kiln's export exactly.
#[test]
fn transformers_reads_kiln_exports_exactly() {
    let dir = fixture("roundtrip");
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf_check.json")).unwrap()).unwrap();
    assert_eq!(check["transformers_loaded"], true);
    let (b, t, ids, want) = hf_logits(&dir);
    let device = Default::default();
    let model = Model::<Flex>::from_hf_dir(&dir, &device).unwrap();
    let input = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
    let got = to_vec(model.forward(input).logits);
    let diff = max_abs_diff(&got, &want);
    eprintln!("roundtrip: kiln vs transformers logits max abs diff {diff:.2e}");
    assert!(diff < 1e-5, "logits differ by {diff:e}");
}

/// The package directory: cargo's run-time `CARGO_MANIFEST_DIR` (right even when the
/// build directory is shared by checkouts at other paths), else the compile-time one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// kiln trained LoRA adapters on the round-trip base and exported them with
/// `kiln export --format peft`; PEFT's `PeftModel.from_pretrained` loaded them onto the base
/// and wrote its logits (`scripts/make_peft_fixture.sh`). kiln, loading the same base and
/// adapter directory, must compute the same logits.
#[test]
fn peft_reads_kiln_adapters_exactly() {
    let dir = fixture("peft");
    let (b, t, ids, want) = hf_logits(&dir);
    let device = Default::default();
    let base = Model::<Flex>::from_hf_dir(&fixture("roundtrip"), &device).unwrap();
    let input = || Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &device);
    let without = to_vec(base.clone().forward(input()).logits);
    let model = base.load_peft_adapter(&dir, &device).unwrap();
    let got = to_vec(model.forward(input()).logits);
    let diff = max_abs_diff(&got, &want);
    let effect = max_abs_diff(&without, &want);
    eprintln!(
        "peft: kiln vs PEFT logits max abs diff {diff:.2e} (the adapter itself moves them by {effect:.2e})"
    );
    assert!(
        effect > 1e-3,
        "the adapter must change the logits for this test to mean anything"
    );
    assert!(diff < 1e-5, "logits differ by {diff:e}");
}
