//! The flow-matching Euler schedule: diffusers `FlowMatchEulerDiscreteScheduler` with a static
//! `shift` (SD3: 3.0 from `scheduler/scheduler_config.json`), `set_timesteps(N)` and `step`.
//! Upstream: diffusers `schedulers/scheduling_flow_match_euler_discrete.py` (v0.42.1).

/// Sigmas (N + 1, ending in 0) and timesteps (N) for `steps` inference steps, in f32 as diffusers
/// computes them: `t = linspace(σ_max·T, σ_min·T, N)`, `σ = shift·s / (1 + (shift − 1)·s)` with
/// `s = t / T` (`T` = 1000 training steps; `σ_max`, `σ_min` the shifted ends of the training
/// schedule).
pub fn flow_match_schedule(steps: usize, shift: f64, num_train_timesteps: usize) -> (Vec<f32>, Vec<f32>) {
    let tt = num_train_timesteps as f32;
    let shifted = |s: f32| shift as f32 * s / (1.0 + (shift as f32 - 1.0) * s);
    // training schedule ends: timesteps 1..=T as f32, sigmas = t / T, shifted
    let sigma_max = shifted(1.0);
    let sigma_min = shifted(1.0 / tt);
    // np.linspace in float64 on the Python floats σ·T, then / T and shifted in float64, cast to f32
    let (a, b) = (sigma_max as f64 * tt as f64, sigma_min as f64 * tt as f64);
    let mut sigmas: Vec<f32> = (0..steps)
        .map(|i| {
            let t = if steps == 1 { a } else { a + (b - a) * i as f64 / (steps - 1) as f64 };
            let s = t / tt as f64;
            (shift * s / (1.0 + (shift - 1.0) * s)) as f32
        })
        .collect();
    let timesteps = sigmas.iter().map(|s| s * tt).collect();
    sigmas.push(0.0);
    (sigmas, timesteps)
}

/// One Euler step: `x + (σ_next − σ)·v`.
pub fn euler_step<B: burn::prelude::Backend, const D: usize>(
    sample: burn::prelude::Tensor<B, D>,
    velocity: burn::prelude::Tensor<B, D>,
    sigma: f32,
    sigma_next: f32,
) -> burn::prelude::Tensor<B, D> {
    sample + velocity.mul_scalar(sigma_next - sigma)
}
