//! Backend-specific kernels behind generic model code: a value of a generic type as the
//! concrete type a `TypeId` check proved it to be, and float tensors to and from primitives
//! (used by `flex` and `libtorch`).
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

/// A value of one type as another that a `TypeId` check proved identical.
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> U {
    *(Box::new(t) as Box<dyn std::any::Any>).downcast::<U>().expect("backend type checked by TypeId")
}

/// The primitive of a float tensor.
pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// A float tensor from its primitive.
pub(crate) fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}
