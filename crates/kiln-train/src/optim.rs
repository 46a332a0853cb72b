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

use kiln_models::PathStack;
use kiln_recipe::OptimSection;

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

/// AdamW (Loshchilov and Hutter): decoupled weight decay, bias-corrected moments.
#[derive(Debug)]
pub struct AdamW<B: Backend> {
    config: OptimSection,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
    /// Moments by parameter name.
    pub state: BTreeMap<String, Moments<B>>,
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: &OptimSection) -> Self {
        Self {
            config: config.clone(),
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step<AB, M>(&mut self, model: M, grads: BTreeMap<String, Tensor<B, 1>>, lr: f64) -> M
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
        };
        model.map(&mut mapper)
    }

    fn update(
        &mut self,
        name: &str,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        rank: usize,
        lr: f64,
    ) -> Tensor<B, 1> {
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
        let param = if wd > 0.0 && kiln_models::decays(name, rank) {
            param.mul_scalar(1.0 - lr * wd)
        } else {
            param
        };
        self.state.insert(name.to_string(), moments);
        param - update
    }
}

struct Update<'a, AB: AutodiffBackend> {
    path: PathStack,
    grads: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
    optim: &'a mut AdamW<AB::InnerBackend>,
    lr: f64,
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
        let Some(grad) = self.grads.remove(&name) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        let flat = tensor.inner().reshape([n]);
        let updated = self.optim.update(&name, flat, grad, D, self.lr);
        let tensor = Tensor::<AB, D>::from_inner(updated.reshape(shape)).require_grad();
        Param::from_mapped_value(id, tensor, mapper)
    }
}
