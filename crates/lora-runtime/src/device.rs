//! Run-time backend selection: `--device cpu|cuda[:N]|tch-cpu|tch-cuda[:N]`.
//!
//! Backends are cargo features of the crates that run models (`flex` default, `cuda`, `tch`);
//! [`dispatch!`](crate::dispatch) expands one arm per backend compiled into the *calling* crate.
use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A device named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Burn's pure-Rust Flex CPU backend (feature `flex`).
    Cpu,
    /// burn-cuda on GPU N (feature `cuda`).
    Cuda(usize),
    /// LibTorch on the CPU (feature `tch`).
    TchCpu,
    /// LibTorch on CUDA GPU N (feature `tch`).
    TchCuda(usize),
}

impl DeviceSpec {
    /// The cargo feature that compiles this backend in.
    pub fn feature(&self) -> &'static str {
        match self {
            DeviceSpec::Cpu => "flex",
            DeviceSpec::Cuda(_) => "cuda",
            DeviceSpec::TchCpu | DeviceSpec::TchCuda(_) => "tch",
        }
    }

    /// The error for a device whose backend is not compiled into this binary.
    pub fn not_compiled(&self) -> Error {
        Error::Device {
            device: self.to_string(),
            message: format!("this binary was built without the `{}` backend; rebuild with `--features {}`", self.feature(), self.feature()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::TchCpu => write!(f, "tch-cpu"),
            DeviceSpec::TchCuda(i) => write!(f, "tch-cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let index = |rest: Option<&str>| -> Result<usize, Error> {
            match rest {
                None => Ok(0),
                Some(i) => i.parse().map_err(|_| Error::Device { device: s.into(), message: format!("`{i}` is not a GPU index") }),
            }
        };
        let (name, idx) = match s.split_once(':') {
            Some((n, i)) => (n, Some(i)),
            None => (s, None),
        };
        match name {
            "cpu" | "flex" if idx.is_none() => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(index(idx)?)),
            "tch-cpu" if idx.is_none() => Ok(DeviceSpec::TchCpu),
            "tch-cuda" => Ok(DeviceSpec::TchCuda(index(idx)?)),
            _ => Err(Error::Device { device: s.into(), message: "unknown device; expected cpu, cuda[:N], tch-cpu or tch-cuda[:N]".into() }),
        }
    }
}

/// Calls `$run::<Autodiff<Backend>>(&device, args…)` for the backend of a [`DeviceSpec`];
/// `$run` returns `Result<_, E>` with `E: From<lora_runtime::Error>`. Arms exist only for the
/// backends enabled (`flex`, `cuda`, `tch` features) in the crate that expands the macro.
#[macro_export]
macro_rules! dispatch {
    ($spec:expr, $run:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(unreachable_patterns)]
        match $spec {
            #[cfg(feature = "flex")]
            $crate::device::DeviceSpec::Cpu => {
                $run::<burn::backend::Autodiff<burn::backend::Flex>>(&Default::default(), $($arg),*)
            }
            #[cfg(feature = "cuda")]
            $crate::device::DeviceSpec::Cuda(i) => {
                $run::<burn::backend::Autodiff<burn::backend::Cuda>>(&burn::backend::cuda::CudaDevice::new(i), $($arg),*)
            }
            #[cfg(feature = "tch")]
            $crate::device::DeviceSpec::TchCpu => {
                $run::<burn::backend::Autodiff<burn::backend::LibTorch>>(&burn::backend::libtorch::LibTorchDevice::Cpu, $($arg),*)
            }
            #[cfg(feature = "tch")]
            $crate::device::DeviceSpec::TchCuda(i) => {
                $run::<burn::backend::Autodiff<burn::backend::LibTorch>>(&burn::backend::libtorch::LibTorchDevice::Cuda(i), $($arg),*)
            }
            other => Err(other.not_compiled().into()),
        }
    }};
}
