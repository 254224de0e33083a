use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::Distribution;
use std::time::Instant;

fn main() {
    let dev = Default::default();
    let (b, h, l, d) = (1, 24, 1178, 64);
    let hm = std::env::var("HM").is_ok();
    let mk = || {
        let t = Tensor::<Flex, 4>::random([b, l, h, d], Distribution::Normal(0.0, 1.0), &dev);
        if hm { serial_lora::layers::contiguous(t.swap_dims(1, 2)).swap_dims(1, 2) } else { t }
    };
    let (q, k, v) = (mk(), mk(), mk());
    let flops = 4.0 * (b * h * l * l * d) as f64;
    for rep in 0..5 {
        let t = Instant::now();
        let o = serial_lora::sdpa(q.clone().swap_dims(1, 2), k.clone().swap_dims(1, 2), v.clone().swap_dims(1, 2), None, None);
        std::hint::black_box(&o);
        let dt = t.elapsed().as_secs_f64();
        let ad = |t: &Tensor<Flex, 4>| Tensor::<Autodiff<Flex>, 4>::from_inner(t.clone()).require_grad();
        let (qa, ka, va) = (ad(&q), ad(&k), ad(&v));
        let o = serial_lora::sdpa(qa.clone().swap_dims(1, 2), ka.clone().swap_dims(1, 2), va.clone().swap_dims(1, 2), None, None);
        let t = Instant::now();
        let g = o.sum().backward();
        std::hint::black_box(qa.grad(&g));
        let db = t.elapsed().as_secs_f64();
        println!("rep {rep}: forward {dt:.4} s ({:.0} GFLOP/s) backward {db:.4} s", flops / dt / 1e9);
    }
}
