//! Parameter counts and parameter paths (for freezing checks and LoRA+ grouping).
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::prelude::*;

/// Total and trainable parameter counts of a module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    pub total: usize,
    pub trainable: usize,
}

/// One float parameter: its dotted path (`layers.0.qkv.Separate.q.lora.lora_b`), id, rank and
/// element count, and whether it receives gradients.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub path: String,
    pub id: ParamId,
    pub ndim: usize,
    pub numel: usize,
    pub shape: Vec<usize>,
    pub trainable: bool,
}

#[derive(Default)]
struct Collector {
    stack: Vec<String>,
    out: Vec<ParamInfo>,
}

impl<B: Backend> ModuleVisitor<B> for Collector {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.out.push(ParamInfo {
            path: self.stack.join("."),
            id: p.id,
            ndim: D,
            numel: p.lazy_shape().num_elements(),
            shape: p.lazy_shape().to_vec(),
            trainable: p.is_require_grad(),
        });
    }
}

/// Every float parameter of `module`, in visit order.
pub fn param_infos<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamInfo> {
    let mut c = Collector::default();
    module.visit(&mut c);
    c.out
}

/// Parameter counting on any module.
pub trait ParamCountExt<B: Backend>: Module<B> {
    /// Total and trainable counts in one pass.
    fn param_counts(&self) -> ParamCounts {
        param_infos::<B, Self>(self)
            .iter()
            .fold(ParamCounts::default(), |acc, p| ParamCounts { total: acc.total + p.numel, trainable: acc.trainable + if p.trainable { p.numel } else { 0 } })
    }
    /// Number of parameters that receive gradients.
    fn trainable_params(&self) -> usize {
        self.param_counts().trainable
    }
    /// Number of parameters, frozen or not.
    fn total_params(&self) -> usize {
        self.param_counts().total
    }
}

impl<B: Backend, M: Module<B>> ParamCountExt<B> for M {}
