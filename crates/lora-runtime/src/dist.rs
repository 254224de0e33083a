//! Data-parallel training over burn-collective: one process per device, launched like
//! `torchrun`.
//!
//! Upstream: burn-collective 0.21 (`register` / `all_reduce` / `finish_collective` and the
//! global orchestrator), and the launch contract of `torchrun` (`--nnodes`, `--node-rank`,
//! `--rdzv-endpoint`, one worker per device with its rank in the environment).
//!
//! A job is `--devices d0,d1,…` on each of `--nodes` machines. The command the user starts
//! becomes a *launcher*: on node 0 it serves burn-collective's global orchestrator, and on every
//! node it starts one copy of itself per device, with the copy's place in the job in the
//! environment (`SERIAL_LORA_RANK`, …), then waits for them; when one fails it stops the others
//! and exits with that status. Each copy is a [`Peer`] and trains a full replica on its device.
//!
//! Every step the peers split the global batch (`--batch` per device × peers) into contiguous
//! shards ([`Peer::shard`]), scale their mean loss by their share of the batch
//! ([`Peer::weight`]), and sum the gradients of the trainable (adapter) parameters together with
//! the step's statistics ([`Peer::all_reduce`]). The update is then the single-device update on
//! the whole batch: `--batch` × peers and `--lr` mean what they mean on one device, and random
//! draws made per sample (augmentation, noise) are the same; adapter dropout masks differ, as
//! they do between ranks in PyTorch DDP.
//!
//! Every peer is a burn-collective *node* with one device, on one machine as on many, so one code
//! path serves both. Gradients travel as one flat f32 tensor over WebSocket: 4 bytes per trainable
//! parameter, which is small for adapters. burn-collective 0.21's global mode hangs on the second
//! operation of a registration (`SyncService::sync` clears a copy of its peer list), so every
//! operation here registers, reduces once and finishes (`shared/docs/burn-0.21-guide.md` §7.2).
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command};
use std::time::Duration;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use burn_collective::{CollectiveConfig, PeerId, ReduceOperation};

use crate::error::{Error, Result};
use serial_lora::params::{ParamInfo, param_infos};
use crate::run::stream_seed;

const ENV_RANK: &str = "SERIAL_LORA_RANK";
const ENV_WORLD: &str = "SERIAL_LORA_WORLD_SIZE";
const ENV_LOCAL_RANK: &str = "SERIAL_LORA_LOCAL_RANK";
const ENV_ORCHESTRATOR: &str = "SERIAL_LORA_ORCHESTRATOR";
const ENV_NODE_ADDRESS: &str = "SERIAL_LORA_NODE_ADDRESS";
const ENV_DATA_PORT: &str = "SERIAL_LORA_DATA_PORT";

/// The data-parallel flags of every `train` command (named after torchrun's).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct DistArgs {
    /// Data-parallel training on these devices of this node, one process each (e.g.
    /// `cuda:0,cuda:1`; `cpu,cpu` runs two CPU processes). --batch is per device: the effective
    /// batch is --batch × devices × nodes. Replaces --device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Machines in the job (torchrun --nnodes); each runs the same command with its --node-rank.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// This machine's index in 0..nodes (torchrun --node-rank); node 0 serves the orchestrator.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// host:port of the orchestrator on node 0 (torchrun --rdzv-endpoint); required with
    /// --nodes > 1. Peer r of the job receives data on port+1+r (all interfaces).
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// Address at which the other nodes reach this one (default: this machine's address on the
    /// route to the orchestrator).
    #[arg(long)]
    pub node_address: Option<String>,
}

impl Default for DistArgs {
    /// One device, one node (the flags' defaults).
    fn default() -> Self {
        Self { devices: Vec::new(), nodes: 1, node_rank: 0, orchestrator: None, node_address: None }
    }
}

/// What a `train` command does after [`launch`].
#[derive(Debug)]
pub enum Launch {
    /// Train in this process as `peer`, on `device`.
    Train { peer: Peer, device: String },
    /// This process was the launcher of a data-parallel job; the peers exited with this code.
    Done(i32),
}

/// Where a training process sits in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Global rank in 0..world.
    pub rank: usize,
    pub world: usize,
    /// Index of this peer's device on its node (in `--devices`).
    pub local_rank: usize,
    endpoint: Option<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// host:port of the orchestrator.
    orchestrator: String,
    /// Host at which other peers reach this one.
    host: String,
    data_port: u16,
}

impl Default for Peer {
    fn default() -> Self {
        Self::single()
    }
}

fn bad(key: &'static str, value: impl ToString, why: impl Into<String>) -> Error {
    Error::config(key, value, why)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| bad("devices", "", format!("no free local port: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| bad("devices", "", format!("no free local port: {e}")))
}

/// `host:port` → (host, port).
fn host_port(s: &str) -> Result<(String, u16)> {
    let s = s.trim_start_matches("ws://");
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("orchestrator", s, "expected host:port"))?;
    let port = port.parse().map_err(|_| bad("orchestrator", s, format!("`{port}` is not a port number")))?;
    if host.is_empty() {
        return Err(bad("orchestrator", s, "expected host:port"));
    }
    Ok((host.to_string(), port))
}

/// Decides the role of this process: a peer of a job its launcher started (environment), a
/// single-device run, or the launcher of a data-parallel job, which runs the job to its end here.
/// `device` is the command's --device.
pub fn launch(args: &DistArgs, device: &str) -> Result<Launch> {
    if let Some(peer) = Peer::from_env()? {
        let device = args.devices.get(peer.local_rank).map_or(device, String::as_str).to_string();
        return Ok(Launch::Train { peer, device });
    }
    let devices = if args.devices.is_empty() { vec![device.to_string()] } else { args.devices.clone() };
    for d in &devices {
        d.parse::<crate::DeviceSpec>()?;
    }
    if args.nodes == 0 {
        return Err(bad("nodes", 0, "must be at least 1"));
    }
    if args.node_rank >= args.nodes {
        return Err(bad("node-rank", args.node_rank, format!("must be below --nodes {}", args.nodes)));
    }
    let world = devices.len() * args.nodes;
    if world == 1 {
        return Ok(Launch::Train { peer: Peer::single(), device: devices[0].clone() });
    }
    let orchestrator = match (&args.orchestrator, args.nodes) {
        (Some(o), _) => o.trim_start_matches("ws://").to_string(),
        (None, 1) => format!("127.0.0.1:{}", free_port()?),
        (None, _) => return Err(bad("orchestrator", "", "--nodes > 1 needs --orchestrator host:port (node 0's address)")),
    };
    let (orch_host, orch_port) = host_port(&orchestrator)?;
    let host = match (&args.node_address, args.nodes) {
        (Some(h), _) => h.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => route_address(&orch_host, orch_port)?,
    };
    if args.node_rank == 0 {
        serve_orchestrator(orch_port)?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut children: Vec<Child> = Vec::with_capacity(devices.len());
    for local in 0..devices.len() {
        let rank = args.node_rank * devices.len() + local;
        let data_port = match args.nodes {
            1 => free_port()?,
            _ => u16::try_from(usize::from(orch_port) + 1 + rank)
                .map_err(|_| bad("orchestrator", &orchestrator, format!("no room for {world} data ports above the port")))?,
        };
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD, world.to_string())
            .env(ENV_LOCAL_RANK, local.to_string())
            .env(ENV_ORCHESTRATOR, &orchestrator)
            .env(ENV_NODE_ADDRESS, &host)
            .env(ENV_DATA_PORT, data_port.to_string())
            .spawn()
            .map_err(|e| Error::io(&exe, e));
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    Ok(Launch::Done(wait_all(children)))
}

/// The local address of this machine on the route to `host:port` (no packet is sent).
fn route_address(host: &str, port: u16) -> Result<String> {
    let probe = || -> std::io::Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect((host, port))?;
        Ok(s.local_addr()?.ip().to_string())
    };
    probe().map_err(|e| bad("orchestrator", format!("{host}:{port}"), format!("no route to it ({e}); give --node-address")))
}

/// Serves burn-collective's global orchestrator on `port` (all interfaces) for the life of
/// this process.
fn serve_orchestrator(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::io("orchestrator runtime", e))?;
    std::thread::spawn(move || rt.block_on(burn_collective::start_global_orchestrator(port)));
    Ok(())
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits for every peer; the first failure stops the others. Returns the job's exit code.
fn wait_all(mut children: Vec<Child>) -> i32 {
    let mut running: Vec<bool> = vec![true; children.len()];
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            match c.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) if status.success() => running[i] = false,
                other => {
                    let code = other.ok().flatten().and_then(|s| s.code()).unwrap_or(1);
                    eprintln!("data-parallel peer {i} of this node failed (exit code {code}); stopping the others");
                    stop_all(&mut children);
                    return code.max(1);
                }
            }
        }
        if !running.contains(&true) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Peer {
    /// The only peer of a single-device run.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, local_rank: 0, endpoint: None }
    }

    /// The peer a launcher started (its environment), if this process is one.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(rank) = std::env::var(ENV_RANK) else { return Ok(None) };
        let var = |k: &'static str| std::env::var(k).map_err(|_| bad(k, "", format!("missing while {ENV_RANK} is set")));
        let num = |k: &'static str, v: String| v.parse::<usize>().map_err(|_| bad(k, &v, "not a number"));
        let (world, local_rank) = (num(ENV_WORLD, var(ENV_WORLD)?)?, num(ENV_LOCAL_RANK, var(ENV_LOCAL_RANK)?)?);
        let rank = num(ENV_RANK, rank)?;
        let port = var(ENV_DATA_PORT)?;
        let data_port = port.parse().map_err(|_| bad(ENV_DATA_PORT, &port, "not a port number"))?;
        if rank >= world {
            return Err(bad(ENV_RANK, rank, format!("must be below {ENV_WORLD} = {world}")));
        }
        let endpoint = Endpoint { orchestrator: var(ENV_ORCHESTRATOR)?, host: var(ENV_NODE_ADDRESS)?, data_port };
        Ok(Some(Self { rank, world, local_rank, endpoint: Some(endpoint) }))
    }

    /// Whether this peer writes the run directory (checkpoints, caches, metrics, adapter): peer 0
    /// of the job, as in torchrun scripts. The others read it (a resumed checkpoint, SD3's latent
    /// cache), so with several nodes `--out` must be on a filesystem they share.
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }

    /// This peer's contiguous share of a global batch and its offset in it; shares differ in
    /// size by at most one, and are empty only when the batch has fewer items than peers.
    pub fn shard<'a, T>(&self, batch: &'a [T]) -> (usize, &'a [T]) {
        let (start, end) = (self.rank * batch.len() / self.world, (self.rank + 1) * batch.len() / self.world);
        (start, &batch[start..end])
    }

    /// The factor of this peer's mean loss over `local` items so that the peers' sum is the
    /// mean over the `global` items of the batch.
    pub fn weight(&self, local: usize, global: usize) -> f32 {
        if self.world == 1 { 1.0 } else { local as f32 / global.max(1) as f32 }
    }

    /// This peer's version of a seed for draws that cannot be split per sample (adapter dropout
    /// masks): `seed` itself on peer 0, so a single-device run is unchanged.
    pub fn seed(&self, seed: u64) -> u64 {
        if self.rank == 0 { seed } else { stream_seed(seed, 0xD15, self.rank as u64) }
    }

    /// Sums, over the peers, the gradients of the trainable parameters of `model` and `stats`
    /// (per-step figures: weighted loss, score, images). A parameter without a gradient on every
    /// peer stays without one. A single peer returns its own.
    pub fn all_reduce<AB: AutodiffBackend, M: AutodiffModule<AB>>(
        &self,
        model: &M,
        mut grads: GradientsParams,
        stats: &mut [f64],
        device: &AB::Device,
    ) -> Result<GradientsParams> {
        if self.world == 1 {
            return Ok(grads);
        }
        let params: Vec<ParamInfo> = param_infos(model).into_iter().filter(|p| p.trainable).collect();
        let mut present = Vec::with_capacity(params.len());
        let mut parts: Vec<Tensor<AB::InnerBackend, 1>> = Vec::with_capacity(params.len() + 1);
        for p in &params {
            let g = take_flat::<AB::InnerBackend>(&mut grads, p.id, p.shape.len());
            present.push(if g.is_some() { 1.0 } else { 0.0 });
            parts.push(g.unwrap_or_else(|| Tensor::zeros([p.numel], device)));
        }
        let tail: Vec<f32> = present.into_iter().chain(stats.iter().map(|&v| v as f32)).collect();
        parts.push(Tensor::from_data(TensorData::new(tail.clone(), [tail.len()]), device));
        let flat = self.sum_flat::<AB::InnerBackend>(Tensor::cat(parts, 0), device)?;

        let grad_len: usize = params.iter().map(|p| p.numel).sum();
        let tail: Vec<f32> = flat.clone().slice(grad_len..grad_len + tail.len()).into_data().iter::<f32>().collect();
        let (present, summed) = tail.split_at(params.len());
        for (s, v) in stats.iter_mut().zip(summed) {
            *s = f64::from(*v);
        }
        let mut out = GradientsParams::new();
        let mut at = 0;
        for (p, &has) in params.iter().zip(present) {
            if has > 0.0 {
                register_shaped::<AB::InnerBackend>(&mut out, p.id, flat.clone().slice(at..at + p.numel), &p.shape);
            }
            at += p.numel;
        }
        Ok(out)
    }

    /// Sums `values` over the peers (also a barrier: it returns once every peer has called it).
    pub fn sum<B: Backend>(&self, values: &mut [f64], device: &B::Device) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let v: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let out = self.sum_flat::<B>(Tensor::from_data(TensorData::new(v.clone(), [v.len()]), device), device)?;
        for (s, v) in values.iter_mut().zip(out.into_data().iter::<f32>()) {
            *s = f64::from(v);
        }
        Ok(())
    }

    /// Checks that every peer passes the same `value` (e.g. the step a resumed run starts at);
    /// `ok = false` on any peer fails all of them with `what`.
    pub fn agree<B: Backend>(&self, ok: bool, value: usize, what: &str, device: &B::Device) -> Result<()> {
        let mut v = [f64::from(u8::from(ok)), value as f64, (value as f64).powi(2)];
        self.sum::<B>(&mut v, device)?;
        let n = self.world as f64;
        if v[0] != n {
            return Err(self.error(format!("{} peer(s) failed to {what}", n - v[0])));
        }
        // Σx = n·x and Σx² = n·x² hold for all peers only when every x is the same.
        if v[1] != n * value as f64 || v[2] != n * (value as f64).powi(2) {
            return Err(self.error(format!("the peers disagree on {what}: this one has {value}")));
        }
        Ok(())
    }

    fn error(&self, message: String) -> Error {
        Error::Collective { rank: self.rank, message }
    }

    fn config(&self) -> Result<CollectiveConfig> {
        let e = self.endpoint.as_ref().ok_or_else(|| self.error("no collective endpoint".into()))?;
        let addr = |s: String| s.parse::<burn_communication::Address>().map_err(|m| self.error(m));
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(self.world as u32)
            .with_global_address(addr(format!("ws://{}", e.orchestrator))?)
            .with_node_address(addr(format!("ws://{}:{}", e.host, e.data_port))?)
            .with_data_service_port(e.data_port))
    }

    /// One all-reduce (sum) of a 1-D tensor over the peers: register, reduce, finish.
    fn sum_flat<B: Backend>(&self, flat: Tensor<B, 1>, device: &B::Device) -> Result<Tensor<B, 1>> {
        let n = flat.dims()[0];
        // The ring all-reduce needs at least one element per peer.
        let flat = if n < self.world { Tensor::cat(vec![flat, Tensor::zeros([self.world - n], device)], 0) } else { flat };
        let id = PeerId(self.rank as u32);
        let err = |op: &str, e: burn_collective::CollectiveError| self.error(format!("{op}: {e:?}"));
        burn_collective::register::<B>(id, device.clone(), self.config()?).map_err(|e| err("register", e))?;
        let reduced = burn_collective::all_reduce::<B>(id, flat.into_primitive().tensor(), ReduceOperation::Sum);
        let finished = burn_collective::finish_collective::<B>(id);
        let reduced = reduced.map_err(|e| err("all-reduce", e))?;
        finished.map_err(|e| err("finish", e))?;
        Ok(Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(reduced)).slice(0..n))
    }
}

/// Removes the gradient of `id` (rank `ndim`) from `grads`, flattened.
fn take_flat<B: Backend>(grads: &mut GradientsParams, id: ParamId, ndim: usize) -> Option<Tensor<B, 1>> {
    fn take<B: Backend, const D: usize>(g: &mut GradientsParams, id: ParamId) -> Option<Tensor<B, 1>> {
        g.remove::<B, D>(id).map(|t| t.flatten(0, D - 1))
    }
    match ndim {
        1 => take::<B, 1>(grads, id),
        2 => take::<B, 2>(grads, id),
        3 => take::<B, 3>(grads, id),
        4 => take::<B, 4>(grads, id),
        _ => None,
    }
}

/// Registers the flat gradient `g` of `id` with its parameter's `shape`.
fn register_shaped<B: Backend>(grads: &mut GradientsParams, id: ParamId, g: Tensor<B, 1>, shape: &[usize]) {
    match *shape {
        [a] => grads.register::<B, 1>(id, g.reshape([a])),
        [a, b] => grads.register::<B, 2>(id, g.reshape([a, b])),
        [a, b, c] => grads.register::<B, 3>(id, g.reshape([a, b, c])),
        [a, b, c, d] => grads.register::<B, 4>(id, g.reshape([a, b, c, d])),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(rank: usize, world: usize) -> Peer {
        Peer { rank, world, local_rank: rank, endpoint: None }
    }

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        for len in 0..20usize {
            let batch: Vec<usize> = (0..len).collect();
            for world in 1..6 {
                let mut seen = Vec::new();
                let mut weights = 0.0;
                for r in 0..world {
                    let (offset, s) = peer(r, world).shard(&batch);
                    assert_eq!(offset, seen.len(), "len {len} world {world} rank {r}");
                    assert!(s.len() + 1 >= len / world && s.len() <= len.div_ceil(world));
                    seen.extend_from_slice(s);
                    weights += peer(r, world).weight(s.len(), len);
                }
                assert_eq!(seen, batch);
                if len > 0 {
                    assert!((weights - 1.0f32).abs() < 1e-6, "weights sum to {weights}");
                }
            }
        }
    }

    #[test]
    fn single_peer_is_the_identity() {
        let p = Peer::single();
        assert_eq!(p.shard(&[1, 2, 3]), (0, &[1, 2, 3][..]));
        assert_eq!(p.weight(3, 3), 1.0);
        assert_eq!(p.seed(42), 42);
        assert!(p.is_writer());
        assert_ne!(peer(1, 2).seed(42), 42);
    }

    #[test]
    fn orchestrator_addresses_are_checked() {
        assert_eq!(host_port("ws://10.0.0.1:29500").unwrap(), ("10.0.0.1".into(), 29500));
        for bad in ["10.0.0.1", ":80", "host:port", "h:70000"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
        let args = DistArgs { nodes: 2, ..Default::default() };
        assert!(launch(&args, "cpu").unwrap_err().to_string().contains("--orchestrator"));
        let args = DistArgs { nodes: 2, node_rank: 2, orchestrator: Some("127.0.0.1:1".into()), ..Default::default() };
        assert!(launch(&args, "cpu").unwrap_err().to_string().contains("node-rank"));
        let args = DistArgs { devices: vec!["cpu".into(), "gpu".into()], ..Default::default() };
        assert!(launch(&args, "cpu").is_err());
        assert!(matches!(launch(&DistArgs::default(), "cpu").unwrap(), Launch::Train { device, .. } if device == "cpu"));
    }
}
