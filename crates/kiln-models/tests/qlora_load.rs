//! A QLoRA base read from a Hugging Face directory is quantized tensor by tensor as it is
//! read (never held as a whole f32 model); the result must be exactly the model that loading
//! the f32 base and then attaching the adapter gives, and its gradients must reach only the
//! adapters, through the NF4 linear op's own backward.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;

use kiln_models::{Model, named_params, trainable_params};

type B = Autodiff<Flex>;

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}

fn recipe(kind: &str) -> kiln_recipe::Recipe {
    let base = manifest_dir().join("../../tests/fixtures/qwen2/roundtrip");
    let notes = manifest_dir().join("../../data/notes.jsonl");
    let text = format!(
        r#"
[run]
name = "qlora-load"
[model]
family = "qwen2"
[model.qwen2]
hf_dir = "{}"
[[data.sources]]
name = "notes"
format = "jsonl"
path = "{}"
[[phases]]
sources = {{ notes = 1.0 }}
batch_size = 2
window = 16
steps = 1
[adapter]
kind = "{kind}"
rank = 4
alpha = 8
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"#,
        base.display(),
        notes.display()
    );
    kiln_recipe::from_str(&text, Path::new("qlora-load.toml"), &[])
        .expect("valid recipe")
        .recipe
}

fn ids(device: &burn::backend::flex::FlexDevice) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 200).collect();
    Tensor::from_data(TensorData::new(data, [2, 12]), device)
}

#[test]
fn quantizing_while_loading_equals_loading_then_quantizing() {
    let device = Default::default();
    let recipe = recipe("qlora");
    let adapter = recipe.adapter.clone().expect("adapter");
    let streamed = Model::<B>::for_training(&recipe, &device).expect("qlora model");
    let after = Model::<B>::from_recipe(&recipe, &device)
        .expect("f32 model")
        .with_adapter(&adapter, recipe.run.seed, &device);

    let base = streamed.adapter_base().expect("an adapter base");
    assert!(base.nf4, "every targeted base weight is NF4");
    assert_eq!(Some(base), after.adapter_base());
    assert!(base.bytes_per_weight() < 0.6, "{}", base.bytes_per_weight());
    // Same remaining parameters (embedding, norms, adapters) and same logits, bit for bit.
    let (a, b) = (named_params(&streamed), named_params(&after));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        !a.keys().any(|k| k.ends_with("q_proj.weight")),
        "{:?}",
        a.keys()
    );
    for (name, t) in &a {
        assert_eq!(t.values, b[name].values, "{name}");
    }
    let logits = |m: &Model<B>| m.forward(ids(&device)).logits.into_data();
    assert_eq!(logits(&streamed), logits(&after));
}

/// The gradient of every trainable parameter, in visit order.
fn adapter_grads(model: &Model<B>, device: &burn::backend::flex::FlexDevice) -> Vec<Vec<f32>> {
    struct Grads<'a> {
        grads: &'a <B as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: Vec<Vec<f32>>,
    }
    impl burn::module::ModuleVisitor<B> for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.out.push(g.into_data().to_vec().unwrap());
            }
        }
    }
    let loss = model.forward(ids(device)).logits.powi_scalar(2).mean();
    let grads = loss.backward();
    let mut visitor = Grads {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

#[test]
fn nf4_base_gradients_equal_those_of_its_dequantized_f32_copy() {
    let device = Default::default();
    let qlora = Model::<B>::for_training(&recipe("qlora"), &device).expect("qlora model");
    assert!(
        trainable_params(&qlora)
            .keys()
            .all(|k| k.contains(".lora_")),
        "only adapters train"
    );
    // The same base dequantized to f32 (B is zero, so merging adds nothing), with the same
    // adapters attached: a LoRA model through Burn's own matmul backward.
    let lora = recipe("lora");
    let dense = qlora.clone().merged(&device).with_adapter(
        lora.adapter.as_ref().expect("adapter"),
        lora.run.seed,
        &device,
    );
    assert!(!dense.adapter_base().expect("adapter base").nf4);
    let (gq, gd) = (
        adapter_grads(&qlora, &device),
        adapter_grads(&dense, &device),
    );
    // lora_A and lora_B of 2 layers x 7 projections.
    assert_eq!(gq.len(), 2 * 7 * 2);
    assert_eq!(gq.len(), gd.len());
    let mut nonzero = 0;
    for (q, d) in gq.iter().zip(&gd) {
        let scale = d.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let worst = q.iter().zip(d).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-4 * scale, "{worst} vs {scale}");
        nonzero += usize::from(q.iter().any(|v| *v != 0.0));
    }
    // B is zero at init: lora_B gets a gradient (which needs the input gradient to flow back
    // through the NF4 projections above it), lora_A does not yet.
    assert_eq!(nonzero, 2 * 7);
}
