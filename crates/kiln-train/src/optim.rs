//! AdamW over named parameters, with gradient accumulation and global-norm clipping.
//!
//! kiln keeps its own optimizer instead of Burn's `OptimizerAdaptor` because state must be
//! keyed by checkpoint name (so a checkpoint is readable and survives module rebuilds), it
//! must checkpoint bit-exactly, and later optimizers (8-bit AdamW, per-tensor learning-rate
//! multipliers) need the same bookkeeping. Every tensor is handled flattened to 1-D.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use kiln_models::{NamedTensor, PathStack};
use kiln_recipe::{OptimKind, OptimSection};

use crate::TrainError;

/// Summed gradients of the micro-batches of one optimizer step, by parameter name.
#[derive(Debug)]
pub struct GradAccumulator<B: Backend> {
    grads: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Default for GradAccumulator<B> {
    fn default() -> Self {
        Self {
            grads: BTreeMap::new(),
        }
    }
}

struct Collect<'a, B: AutodiffBackend> {
    path: PathStack,
    grads: &'a mut B::Gradients,
    acc: &'a mut BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(_name, container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = param.val().grad_remove(self.grads) else {
            return;
        };
        let n = grad.shape().num_elements();
        let grad = grad.reshape([n]);
        let name = self.path.path();
        let summed = match self.acc.remove(&name) {
            Some(prev) => prev + grad,
            None => grad,
        };
        self.acc.insert(name, summed);
    }
}

impl<IB: Backend> GradAccumulator<IB> {
    /// Adds the gradients of one backward pass.
    pub fn accumulate<B, M>(&mut self, model: &M, mut grads: B::Gradients)
    where
        B: AutodiffBackend<InnerBackend = IB>,
        M: AutodiffModule<B>,
    {
        let mut c = Collect::<B> {
            path: PathStack::default(),
            grads: &mut grads,
            acc: &mut self.grads,
        };
        model.visit(&mut c);
    }

    /// Global L2 norm of all gradients.
    pub fn global_norm(&self) -> f64 {
        let mut total = None;
        for g in self.grads.values() {
            let sq = g.clone().square().sum();
            total = Some(match total {
                Some(t) => t + sq,
                None => sq,
            });
        }
        match total {
            Some(t) => f64::from(t.into_scalar().elem::<f32>()).sqrt(),
            None => 0.0,
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for g in self.grads.values_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// The summed gradients so far, by parameter name (flattened).
    pub fn grads(&self) -> &BTreeMap<String, Tensor<IB, 1>> {
        &self.grads
    }

    /// Sets the gradient of parameter `name` (flattened).
    pub fn insert(&mut self, name: String, grad: Tensor<IB, 1>) {
        self.grads.insert(name, grad);
    }

    /// Takes the summed gradients, leaving the accumulator empty.
    pub fn take(&mut self) -> BTreeMap<String, Tensor<IB, 1>> {
        std::mem::take(&mut self.grads)
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    /// Exponential average of gradients.
    pub m: Tensor<B, 1>,
    /// Exponential average of squared gradients.
    pub v: Tensor<B, 1>,
}

/// 8-bit moments of one parameter (bitsandbytes' 8-bit AdamW layout): blocks of 256
/// values, each with its absmax; `m` on the signed dynamic map, `v` on the unsigned one.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments8 {
    /// First-moment codes.
    pub m_codes: Vec<u8>,
    /// First-moment block absmax.
    pub m_absmax: Vec<f32>,
    /// Second-moment codes.
    pub v_codes: Vec<u8>,
    /// Second-moment block absmax.
    pub v_absmax: Vec<f32>,
}

/// Values per block of 8-bit optimizer state.
pub const STATE_BLOCK: usize = 256;
/// Tensors smaller than this keep f32 moments under `adamw8bit` (as bitsandbytes).
pub const MIN_8BIT_SIZE: usize = 4096;

/// AdamW (Loshchilov and Hutter): decoupled weight decay, bias-corrected moments; with
/// `kind = "adamw8bit"`, the moments of tensors of at least 4096 values are kept
/// blockwise-quantized to 8 bits between steps (dequantized, updated in f32, requantized).
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    config: OptimSection,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
    /// f32 moments by parameter name.
    pub state: BTreeMap<String, Moments<B>>,
    /// 8-bit moments by parameter name.
    pub state8: BTreeMap<String, Moments8>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: &OptimSection) -> Self {
        Self {
            config: config.clone(),
            step: 0,
            state: BTreeMap::new(),
            state8: BTreeMap::new(),
        }
    }

    /// The optimizer state as named f32 tensors (8-bit codes are stored as exact f32
    /// integers): `m.<p>`, `v.<p>`, or `m8.codes.<p>`, `m8.absmax.<p>`, `v8.codes.<p>`,
    /// `v8.absmax.<p>`.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, NamedTensor>, TrainError> {
        let mut out = BTreeMap::new();
        let mut put = |key: String, values: Vec<f32>| {
            out.insert(
                key,
                NamedTensor {
                    shape: vec![values.len()],
                    values,
                },
            );
        };
        for (name, m) in &self.state {
            for (prefix, t) in [("m", &m.m), ("v", &m.v)] {
                let key = format!("{prefix}.{name}");
                let values = crate::read_back(t.to_data(), || format!("optimizer moment `{key}`"))?;
                put(key, values);
            }
        }
        for (name, q) in &self.state8 {
            let codes = |c: &[u8]| c.iter().map(|x| f32::from(*x)).collect::<Vec<f32>>();
            put(format!("m8.codes.{name}"), codes(&q.m_codes));
            put(format!("m8.absmax.{name}"), q.m_absmax.clone());
            put(format!("v8.codes.{name}"), codes(&q.v_codes));
            put(format!("v8.absmax.{name}"), q.v_absmax.clone());
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] wrote.
    pub fn load_state_tensors(
        &mut self,
        mut tensors: BTreeMap<String, NamedTensor>,
        step: u64,
        device: &B::Device,
    ) -> Result<(), String> {
        self.step = step;
        let names = |tensors: &BTreeMap<String, NamedTensor>, prefix: &str| -> Vec<String> {
            tensors
                .keys()
                .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
                .collect()
        };
        let f32_names = names(&tensors, "m.");
        let q8_names = names(&tensors, "m8.codes.");
        let mut take = |key: String| {
            tensors
                .remove(&key)
                .ok_or_else(|| format!("optimizer tensor `{key}` is missing"))
        };
        for name in f32_names {
            let (m, v) = (take(format!("m.{name}"))?, take(format!("v.{name}"))?);
            let to_tensor = |t: NamedTensor| {
                let n = t.values.len();
                Tensor::<B, 1>::from_data(TensorData::new(t.values, [n]), device)
            };
            self.state.insert(
                name,
                Moments {
                    m: to_tensor(m),
                    v: to_tensor(v),
                },
            );
        }
        for name in q8_names {
            let codes = |t: NamedTensor| t.values.iter().map(|x| *x as u8).collect::<Vec<u8>>();
            let q = Moments8 {
                m_codes: codes(take(format!("m8.codes.{name}"))?),
                m_absmax: take(format!("m8.absmax.{name}"))?.values,
                v_codes: codes(take(format!("v8.codes.{name}"))?),
                v_absmax: take(format!("v8.absmax.{name}"))?.values,
            };
            self.state8.insert(name, q);
        }
        match tensors.keys().next() {
            Some(left) => Err(format!("unexpected optimizer tensor `{left}`")),
            None => Ok(()),
        }
    }

    /// Bytes of optimizer state held.
    pub fn state_bytes(&self) -> usize {
        let f32s: usize = self
            .state
            .values()
            .map(|m| 2 * 4 * m.m.shape().num_elements())
            .sum();
        let q8: usize = self
            .state8
            .values()
            .map(|q| q.m_codes.len() + q.v_codes.len() + 4 * (q.m_absmax.len() + q.v_absmax.len()))
            .sum();
        f32s + q8
    }

    /// The 8-bit update of one parameter, on the host.
    fn update_8bit(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        decay: bool,
        lr: f64,
    ) -> Result<Tensor<B, 1>, TrainError> {
        use kiln_models::nf4::{
            dequantize_blockwise, dynamic_map, dynamic_map_unsigned, quantize_nearest,
        };
        let [b1, b2] = self.config.betas;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let device = param.device();
        let g = crate::read_back(grad.into_data(), || format!("the gradient of `{name}`"))?;
        let mut p = crate::read_back(param.into_data(), || format!("parameter `{name}`"))?;
        let (smap, umap) = (dynamic_map(), dynamic_map_unsigned());
        let (mut m, mut v) = match self.state8.remove(name) {
            Some(q) => (
                dequantize_blockwise(&q.m_codes, &q.m_absmax, &smap, STATE_BLOCK),
                dequantize_blockwise(&q.v_codes, &q.v_absmax, &umap, STATE_BLOCK),
            ),
            None => (vec![0.0; g.len()], vec![0.0; g.len()]),
        };
        let (wd, eps) = (self.config.weight_decay, self.config.eps);
        for i in 0..g.len() {
            let gi = f64::from(g[i]);
            let mi = b1 * f64::from(m[i]) + (1.0 - b1) * gi;
            let vi = b2 * f64::from(v[i]) + (1.0 - b2) * gi * gi;
            let mut pi = f64::from(p[i]);
            if decay && wd > 0.0 {
                pi *= 1.0 - lr * wd;
            }
            pi -= lr * (mi / bc1) / ((vi / bc2).sqrt() + eps);
            (m[i], v[i], p[i]) = (mi as f32, vi as f32, pi as f32);
        }
        let (m_codes, m_absmax) = quantize_nearest(&m, &smap, STATE_BLOCK);
        let (v_codes, v_absmax) = quantize_nearest(&v, &umap, STATE_BLOCK);
        self.state8.insert(
            name.to_string(),
            Moments8 {
                m_codes,
                m_absmax,
                v_codes,
                v_absmax,
            },
        );
        let n = p.len();
        Ok(Tensor::from_data(TensorData::new(p, [n]), &device))
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient;
    /// a parameter named in `multipliers` gets `lr` times its multiplier (for its update and
    /// its weight decay, as a PyTorch parameter group with its own learning rate). Fails
    /// if a parameter or gradient that the update reads on the host cannot be read back;
    /// the model is then dropped, half updated.
    pub fn step<AB, M>(
        &mut self,
        model: M,
        grads: BTreeMap<String, Tensor<B, 1>>,
        lr: f64,
        multipliers: &BTreeMap<String, f64>,
    ) -> Result<M, TrainError>
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        self.step += 1;
        let mut mapper = Update::<AB> {
            path: PathStack::default(),
            grads,
            optim: self,
            lr,
            multipliers,
            error: None,
        };
        let model = model.map(&mut mapper);
        match mapper.error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }

    fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        rank: usize,
        lr: f64,
    ) -> Result<Tensor<B, 1>, TrainError> {
        let decay = kiln_models::decays(name, rank);
        if self.config.kind == OptimKind::Adamw8bit && param.shape().num_elements() >= MIN_8BIT_SIZE
        {
            return self.update_8bit(name, param, grad, decay, lr);
        }
        let [b1, b2] = self.config.betas;
        let t = self.step as i32;
        let moments = match self.state.remove(name) {
            Some(s) => Moments {
                m: s.m.mul_scalar(b1) + grad.clone().mul_scalar(1.0 - b1),
                v: s.v.mul_scalar(b2) + grad.square().mul_scalar(1.0 - b2),
            },
            None => Moments {
                m: grad.clone().mul_scalar(1.0 - b1),
                v: grad.square().mul_scalar(1.0 - b2),
            },
        };
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let denom = moments
            .v
            .clone()
            .div_scalar(bc2)
            .sqrt()
            .add_scalar(self.config.eps);
        let update = moments.m.clone().div_scalar(bc1).div(denom).mul_scalar(lr);
        let wd = self.config.weight_decay;
        let param = if wd > 0.0 && decay {
            param.mul_scalar(1.0 - lr * wd)
        } else {
            param
        };
        self.state.insert(name.to_string(), moments);
        Ok(param - update)
    }
}

struct Update<'a, AB: AutodiffBackend> {
    path: PathStack,
    grads: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
    optim: &'a mut AdamW<AB::InnerBackend>,
    lr: f64,
    multipliers: &'a BTreeMap<String, f64>,
    /// The first update that failed; the parameters after it are left as they were.
    error: Option<TrainError>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(_name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let name = self.path.path();
        if self.error.is_some() {
            return param;
        }
        let Some(grad) = self.grads.remove(&name) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let device = tensor.device();
        let n = shape.num_elements();
        let flat = tensor.inner().reshape([n]);
        let lr = self.lr * self.multipliers.get(&name).copied().unwrap_or(1.0);
        let updated = match self.optim.update(&name, flat, grad, D, lr) {
            Ok(t) => t.reshape(shape),
            Err(e) => {
                // The parameter was consumed by the failed read; the step returns the error
                // and the model is dropped, so zeros stand in for it.
                self.error = Some(e);
                Tensor::zeros(shape, &device)
            }
        };
        let tensor = Tensor::<AB, D>::from_inner(updated).require_grad();
        Param::from_mapped_value(id, tensor, mapper)
    }
}
