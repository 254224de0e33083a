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

/// `return $body` with the type `$IB` naming the inner backend when `$B` is `Autodiff<$IB>` for
/// a backend of this build (Flex, LibTorch, CUDA); nothing otherwise. For ops of our own with a
/// backward pass (`Backward<IB, N>` needs the inner backend by name).
macro_rules! return_on_autodiff {
    ($B:ty, $IB:ident => $body:expr) => {{
        #[allow(unused)]
        fn is<B: 'static, IB: 'static>() -> bool {
            std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Autodiff<IB>>()
        }
        #[cfg(feature = "flex")]
        if is::<$B, burn::backend::Flex>() {
            type $IB = burn::backend::Flex;
            return $body;
        }
        #[cfg(feature = "tch")]
        if is::<$B, burn::backend::LibTorch>() {
            type $IB = burn::backend::LibTorch;
            return $body;
        }
        #[cfg(feature = "cuda")]
        if is::<$B, burn::backend::Cuda>() {
            type $IB = burn::backend::Cuda;
            return $body;
        }
    }};
}
pub(crate) use return_on_autodiff;
