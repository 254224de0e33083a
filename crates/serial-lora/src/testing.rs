//! The backend the parity suites run on, chosen by cargo features: Flex by default, LibTorch on
//! the CPU with `tch` (`cargo xtask ci` runs the suites there as well), CUDA with `cuda`
//! (`cargo xtask gpu-check`); and the tolerance they use there.
#[cfg(feature = "cuda")]
pub type Backend = burn::backend::Cuda;
#[cfg(all(feature = "tch", not(feature = "cuda")))]
pub type Backend = burn::backend::LibTorch;
#[cfg(all(feature = "flex", not(any(feature = "tch", feature = "cuda"))))]
pub type Backend = burn::backend::Flex;

/// A parity test's tolerance on [`Backend`]: `tol` itself on the CPU backends (LibTorch included);
/// on CUDA at least 1e-4, the performance issue's bound for GPU outputs against the CPU's (other
/// kernels, other summation orders; the references are the CPU's outputs within ~1e-6).
pub const fn tolerance(tol: f32) -> f32 {
    if cfg!(feature = "cuda") && tol < 1e-4 { 1e-4 } else { tol }
}
