//! LoRA and QLoRA on any family's adaptable projections ([`crate::Family::projections`]):
//! attaching adapters (and freezing the rest), streaming a pretrained checkpoint into NF4
//! bases, merging, and the PEFT adapter format in both directions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

use kiln_recipe::{AdapterKind, AdapterSection};

use crate::init::Init;
use crate::lora::{LoraSpec, Proj};
use crate::nf4::Nf4Tensor;
use crate::{
    KilnBackend, Model, ModelError, NamedTensor, PathStack, Require, ShapeMismatch, WeightMismatch,
    hf, load_checked, load_named_subset, named_params,
};

/// The size of an adapter run's frozen base projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseFootprint {
    /// Weights under adapters.
    pub weights: u64,
    /// Bytes they hold.
    pub bytes: u64,
    /// Whether they are NF4.
    pub nf4: bool,
}

impl BaseFootprint {
    /// Bytes per weight.
    pub fn bytes_per_weight(&self) -> f64 {
        self.bytes as f64 / self.weights.max(1) as f64
    }
}

/// Loads the Hugging Face checkpoint in `dir` into `model`; with `qlora`, every targeted
/// base weight is quantized to NF4 as it is read and the adapter attached on it.
pub(crate) fn load_pretrained<B: KilnBackend>(
    model: Model<B>,
    dir: &Path,
    seed: u64,
    qlora: Option<&AdapterSection>,
    device: &B::Device,
) -> Result<Model<B>, ModelError> {
    let family = model.family();
    let format = family.hf_format().ok_or(ModelError::NoHfFormat {
        family: family.name(),
    })?;
    let mut quantized = BTreeMap::new();
    let tensors = hf::read_checkpoint(dir, |n, t| {
        if let Some(module) = n.strip_suffix(".weight")
            && qlora.is_some_and(|a| is_target(module, a))
            && t.shape.len() == 2
        {
            // Hugging Face layout [out, in], as bitsandbytes quantizes it.
            let q = Nf4Tensor::quantize(&t.values, &t.shape);
            quantized.insert(module.to_string(), Arc::new(q));
            return None;
        }
        format.import_tensor(n, t)
    })?;
    let mut mismatch = WeightMismatch {
        origin: Some(dir.to_path_buf()),
        ..WeightMismatch::default()
    };
    let model = match qlora {
        Some(a) => model.with_adapter_on(a, seed, device, &mut quantized, &mut mismatch),
        None => model,
    };
    mismatch.unused.extend(
        quantized
            .keys()
            .map(|m| format!("{m}.weight (not a projection of this model)")),
    );
    mismatch.into_result()?;
    load_checked(model, tensors, device, Require::AllButAdapters, Some(dir))
}

impl<B: KilnBackend> Model<B> {
    /// Attaches LoRA adapters to the recipe's target projections and freezes every other
    /// parameter; `qlora` also quantizes the targeted base weights to NF4. `A` is drawn
    /// from `seed` by parameter name (kaiming-uniform with a = sqrt(5), as PEFT), `B` is zero.
    pub fn with_adapter(self, adapter: &AdapterSection, seed: u64, device: &B::Device) -> Self {
        self.with_adapter_on(
            adapter,
            seed,
            device,
            &mut BTreeMap::new(),
            &mut WeightMismatch::default(),
        )
    }

    /// [`Model::with_adapter`], taking a target's NF4 base from `quantized` (by module
    /// name) when it is there instead of quantizing the module's own weight; a base of the
    /// wrong shape goes to `mismatch`.
    fn with_adapter_on(
        mut self,
        adapter: &AdapterSection,
        seed: u64,
        device: &B::Device,
        quantized: &mut BTreeMap<String, Arc<Nf4Tensor>>,
        mismatch: &mut WeightMismatch,
    ) -> Self {
        let init = Init::new(seed);
        let scale = if adapter.rslora {
            adapter.alpha / (adapter.rank as f64).sqrt()
        } else {
            adapter.alpha / adapter.rank as f64
        };
        let spec = LoraSpec {
            rank: adapter.rank,
            scale,
            dropout: adapter.dropout,
            nf4: adapter.kind == AdapterKind::Qlora,
        };
        // Families without adaptable projections list none: validation only allows
        // adapters on qwen2, and nothing is attached elsewhere.
        for (name, p) in self.family_mut().projections_mut() {
            if !is_target(&name, adapter) {
                continue;
            }
            let [inp, out] = p.dims();
            match quantized.remove(&name) {
                Some(q) if q.shape == [out, inp] => p.set_nf4_base(q),
                Some(q) => mismatch.shapes.push(ShapeMismatch {
                    tensor: format!("{name}.weight"),
                    expected: vec![out, inp],
                    found: q.shape.to_vec(),
                }),
                None => {}
            }
            let [inp, _] = p.dims();
            let bound = 1.0 / (inp as f64).sqrt();
            let a = init.uniform(
                &format!("{name}.lora_A.weight"),
                [inp, spec.rank],
                bound,
                device,
            );
            p.attach_lora(spec, a, device);
        }
        self.map(&mut Freeze::default())
    }

    /// The model with every adapter merged into its base, as a plain model.
    pub fn merged(mut self, device: &B::Device) -> Self {
        for (_, p) in self.family_mut().projections_mut() {
            p.merge(device);
        }
        self
    }

    /// The frozen base under the adapters: how many weights it has and the bytes they hold
    /// (NF4 codes and statistics for QLoRA, f32 for LoRA); `None` without adapters.
    pub fn adapter_base(&self) -> Option<BaseFootprint> {
        let projs: Vec<&Proj<B>> = self
            .family()
            .projections()
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| p.lora_A.is_some())
            .collect();
        (!projs.is_empty()).then(|| BaseFootprint {
            weights: projs
                .iter()
                .map(|p| p.dims().iter().product::<usize>() as u64)
                .sum(),
            bytes: projs.iter().map(|p| p.base_bytes() as u64).sum(),
            nf4: projs.iter().all(|p| p.nf4.is_some()),
        })
    }

    /// Writes the LoRA adapters as a PEFT adapter directory (`adapter_config.json` +
    /// `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight` `[r, in]`
    /// and `lora_B.weight` `[out, r]`) that `PeftModel.from_pretrained` loads onto `base`.
    pub fn export_peft(
        &self,
        dir: &Path,
        adapter: &AdapterSection,
        base: &str,
    ) -> Result<Vec<PathBuf>, ModelError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let format = peft_format(self)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tensors: BTreeMap<String, NamedTensor> = named_params(self)
            .into_iter()
            .filter(|(n, _)| n.contains(".lora_"))
            .map(|(n, t)| {
                let (n, t) = format.export_tensor(n, t);
                (format!("base_model.model.{n}"), t)
            })
            .collect();
        if tensors.is_empty() {
            return Err(ModelError::NoAdapters);
        }
        let weights = dir.join("adapter_model.safetensors");
        hf::write_tensors(&weights, &tensors)?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": adapter.rank,
            "lora_alpha": adapter.alpha,
            "lora_dropout": adapter.dropout,
            "target_modules": adapter.targets,
            "use_rslora": adapter.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&config).expect("config serializes"),
        )
        .map_err(io(&path))?;
        Ok(vec![weights, path])
    }

    /// Attaches a PEFT LoRA adapter directory (as [`Model::export_peft`] writes it) to this
    /// model, e.g. one loaded with [`Model::from_hf_dir`].
    pub fn load_peft_adapter(self, dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let bad = |m: &str| ModelError::Config {
            path: path.clone(),
            message: m.to_string(),
        };
        let adapter = AdapterSection {
            kind: AdapterKind::Lora,
            rank: cfg["r"].as_u64().ok_or_else(|| bad("`r` missing"))? as usize,
            alpha: cfg["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad("`lora_alpha` missing"))?,
            dropout: 0.0,
            targets: cfg["target_modules"]
                .as_array()
                .ok_or_else(|| bad("`target_modules` must be a list"))?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
        };
        let format = peft_format(&self)?;
        let weights = dir.join("adapter_model.safetensors");
        let tensors = hf::read_checkpoint_file(&weights, |name, t| {
            let name = name
                .strip_prefix("base_model.model.")
                .unwrap_or(&name)
                .replace(".default.", ".");
            Some(
                format
                    .import_tensor(name, t)
                    .expect("adapter tensors are never dropped"),
            )
        })?;
        let model = self.with_adapter(&adapter, 0, device);
        load_named_subset(model, tensors, device)
    }
}

/// The Hugging Face format of a model whose projections take adapters (PEFT files name
/// tensors as the base checkpoint does).
fn peft_format<B: KilnBackend>(model: &Model<B>) -> Result<&dyn crate::HfFormat, ModelError> {
    let family = model.family();
    let no_targets = ModelError::NoAdapterTargets {
        family: family.name(),
    };
    if family.projections().is_empty() {
        return Err(no_targets);
    }
    family.hf_format().ok_or(no_targets)
}

/// Whether the module `name` (`model.layers.0.self_attn.q_proj`) is one of the adapter's
/// targets.
fn is_target(name: &str, adapter: &AdapterSection) -> bool {
    name.starts_with("model.layers.")
        && adapter
            .targets
            .iter()
            .any(|t| name.rsplit('.').next() == Some(t.as_str()))
}

/// Freezes every parameter that is not part of a LoRA adapter.
#[derive(Default)]
struct Freeze {
    path: PathStack,
}

impl<B: Backend> ModuleMapper<B> for Freeze {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.exit(name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.path.path().contains(".lora_") {
            param
        } else {
            param.set_require_grad(false)
        }
    }
}
