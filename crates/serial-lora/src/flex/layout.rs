//! A contiguous copy of a strided Flex tensor in one parallel pass, and the same as an autodiff
//! op (its backward passes the gradient through).
//!
//! Flex's `to_contiguous` (which its `reshape` calls on any view it cannot reinterpret) copies
//! layouts of three or more dimensions element by element through a strided index iterator, on
//! one thread: SAM's window partition, the permutes of its relative-position terms and the
//! head split of its fused `qkv` were 21 % of a SAM-B inference step. Here the layout is
//! collapsed (size-1 dimensions dropped, adjacent dimensions merged where the strides allow),
//! and the rows of the innermost dimension are copied in parallel, as slices where that
//! dimension is unit-stride.
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::DType;
use rayon::prelude::*;

use super::AdTensor;

/// Elements per parallel task (whole rows).
const CHUNK: usize = 1 << 14;

/// Whether `t` is laid out row-major from the start of its buffer (a reshape of it is free).
pub(crate) fn is_contiguous(t: &FlexTensor) -> bool {
    t.layout().contiguous_offsets().is_some_and(|(s, _)| s == 0)
}

/// The shape and strides of a layout with size-1 dimensions dropped and each dimension merged
/// into the one before it where `stride[i] == stride[i + 1]·size[i + 1]`.
fn collapse(shape: &[usize], strides: &[isize]) -> (Vec<usize>, Vec<isize>) {
    let (mut dims, mut st): (Vec<usize>, Vec<isize>) = (Vec::new(), Vec::new());
    for (&n, &s) in shape.iter().zip(strides).filter(|(n, _)| **n != 1) {
        match (dims.last_mut(), st.last_mut()) {
            (Some(pn), Some(ps)) if *ps == s * n as isize => {
                *pn *= n;
                *ps = s;
            }
            _ => {
                dims.push(n);
                st.push(s);
            }
        }
    }
    (dims, st)
}

/// `t` laid out contiguously: itself when it already is, else one parallel copy (f32 views of
/// non-negative strides; Flex's own copy for the rest).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if is_contiguous(&t) {
        return t;
    }
    let layout = t.layout();
    if t.dtype() != DType::F32 || layout.strides().iter().any(|&s| s < 0) {
        return t.to_contiguous();
    }
    let (dims, strides) = collapse(layout.shape(), layout.strides());
    let (Some(&inner), Some(&inner_stride)) = (dims.last(), strides.last()) else {
        return t.to_contiguous();
    };
    if inner == 0 {
        return t.to_contiguous();
    }
    let offset = layout.start_offset() as isize;
    let src = t.storage::<f32>();
    // SAFETY: the rows below cover every element (inner > 0)
    let mut out = unsafe { super::uninit(layout.shape().clone()) };
    let rows_per_task = (CHUNK / inner).max(1);
    let outer = &dims[..dims.len() - 1];
    out.storage_mut::<f32>().par_chunks_mut(inner * rows_per_task).enumerate().for_each(|(task, chunk)| {
        for (r, row) in chunk.chunks_exact_mut(inner).enumerate() {
            let (mut rest, mut at) = (task * rows_per_task + r, offset);
            for (&n, &s) in outer.iter().zip(&strides).rev() {
                at += (rest % n) as isize * s;
                rest /= n;
            }
            let at = at as usize;
            if inner_stride == 1 {
                row.copy_from_slice(&src[at..at + inner]);
            } else {
                let step = inner_stride as usize;
                row.iter_mut().enumerate().for_each(|(j, x)| *x = src[at + j * step]);
            }
        }
    });
    out
}

#[derive(Debug)]
struct Contiguous;

impl Backward<Flex, 1> for Contiguous {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        if let [Some(node)] = &ops.parents {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

/// [`contiguous`] on an `Autodiff<Flex>` tensor (the identity for the gradient).
pub(crate) fn autodiff(x: AdTensor) -> AdTensor {
    if is_contiguous(&x.primitive) {
        return x;
    }
    let y = contiguous(x.primitive.clone());
    match Contiguous.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::flex::Layout;
    use burn::tensor::{Shape, TensorData};

    fn tensor(shape: &[usize]) -> FlexTensor {
        let n: usize = shape.iter().product();
        FlexTensor::from_data(TensorData::new((0..n).map(|i| i as f32).collect::<Vec<_>>(), shape.to_vec()))
    }

    /// The copy equals Flex's own for permuted, narrowed and broadcast views.
    #[test]
    fn copies_views_as_flex_does() {
        let t = tensor(&[2, 6, 5, 4, 3]);
        let views = [
            t.permute(&[0, 2, 1, 3, 4]),
            t.permute(&[4, 3, 2, 1, 0]),
            t.narrow(1, 1, 4).permute(&[0, 2, 1, 3, 4]),
            t.narrow(4, 1, 2),
            t.narrow(0, 1, 1).permute(&[1, 0, 3, 2, 4]),
            t.clone().with_layout(Layout::new(Shape::new([3, 7, 6]), vec![0, 3, 1], 2)),
        ];
        for v in views {
            assert!(!is_contiguous(&v));
            let ours = contiguous(v.clone());
            assert!(is_contiguous(&ours));
            assert_eq!(ours.into_data(), v.to_contiguous().into_data());
        }
    }

    #[test]
    fn collapses_mergeable_dimensions() {
        assert_eq!(collapse(&[2, 1, 3, 4], &[12, 12, 4, 1]), (vec![24], vec![1]));
        assert_eq!(collapse(&[2, 3, 4], &[4, 8, 1]), (vec![2, 3, 4], vec![4, 8, 1]));
    }
}
