//! Data-parallel training: one process per device, launched like `torchrun`, gradients summed
//! through a hub on node 0.
//!
//! Upstream: the launch contract of `torchrun` (`--nnodes`, `--node-rank`, `--rdzv-endpoint`,
//! one worker per device with its rank in the environment) and PyTorch DDP's semantics (the
//! gradients of a step are summed over the ranks before the optimizer step).
//!
//! A job is `--devices d0,d1,…` on each of `--nodes` machines. The command the user starts
//! becomes a *launcher*: on node 0 it serves the job's *hub* at `--orchestrator` (a TCP socket),
//! and on every node it starts one copy of itself per device, with the copy's place in the job in
//! the environment (`SERIAL_LORA_RANK`, …), then waits for them; when one fails it lets the others
//! report and exit, then stops them, and exits with that status. Each copy is a [`Peer`] and trains
//! a full replica on its device.
//!
//! Every step the peers split the global batch (`--batch` per device × peers) into contiguous
//! shards ([`Peer::shard`]), scale their mean loss by their share of the batch
//! ([`Peer::weight`]), and sum the gradients of the trainable (adapter) parameters together with
//! the step's statistics ([`Peer::all_reduce`]). The update is then the single-device update on
//! the whole batch: `--batch` × peers and `--lr` mean what they mean on one device, and random
//! draws made per sample (augmentation, noise) are the same; adapter dropout masks differ, as
//! they do between ranks in PyTorch DDP.
//!
//! The all-reduce is centralised: every peer sends its flat f32 vector to the hub, which adds
//! them in rank order and sends the sum back, so every peer applies bit-identical gradients and
//! a job's sums do not depend on timing. That is 2 × 4 bytes per trainable parameter per peer
//! and step through node 0, which is small for adapters. (burn-collective 0.21, used before,
//! hangs on the second operation of a registration and, registering per operation, lost or mixed
//! up transfers between consecutive operations now and then: a wrong sum or a dead peer.)
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::error::{Error, Result};
use crate::run::stream_seed;
use serial_lora::params::{ParamInfo, param_infos};

const ENV_RANK: &str = "SERIAL_LORA_RANK";
const ENV_WORLD: &str = "SERIAL_LORA_WORLD_SIZE";
const ENV_LOCAL_RANK: &str = "SERIAL_LORA_LOCAL_RANK";
const ENV_ORCHESTRATOR: &str = "SERIAL_LORA_ORCHESTRATOR";

/// How long the hub waits for every peer to connect, and a peer for the hub to accept it (the
/// other nodes' commands may start later than node 0's).
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a launcher lets the other peers report and exit after one failed, before stopping
/// them (so the failing peer's own message is printed, not only the others' "a peer failed").
const FAILURE_GRACE: Duration = Duration::from_secs(3);
/// First word of a peer's greeting to the hub ("SLOR").
const HELLO: u32 = 0x534C_4F52;

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
    /// --nodes > 1. Node 0 listens on this TCP port (all interfaces); every peer connects to it.
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// Accepted for compatibility with earlier releases, unused: peers only connect out, to the
    /// orchestrator.
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
    /// host:port of the job's hub (the orchestrator); `None` for a single peer.
    orchestrator: Option<String>,
}

impl Default for Peer {
    fn default() -> Self {
        Self::single()
    }
}

fn bad(key: &'static str, value: impl ToString, why: impl Into<String>) -> Error {
    Error::config(key, value, why)
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
        (Some(o), _) => Some(o.trim_start_matches("ws://").to_string()),
        (None, 1) => None,
        (None, _) => return Err(bad("orchestrator", "", "--nodes > 1 needs --orchestrator host:port (node 0's address)")),
    };
    let orchestrator = match (orchestrator, args.node_rank) {
        (Some(o), 0) => {
            let (_, port) = host_port(&o)?;
            let hub = TcpListener::bind(("0.0.0.0", port)).map_err(|e| bad("orchestrator", &o, format!("cannot listen on port {port}: {e}")))?;
            serve_hub(hub, world)?;
            o
        }
        (Some(o), _) => {
            host_port(&o)?;
            o
        }
        (None, _) => {
            let hub = TcpListener::bind("127.0.0.1:0").map_err(|e| bad("devices", "", format!("no free local port: {e}")))?;
            let port = hub.local_addr().map_err(|e| bad("devices", "", format!("no free local port: {e}")))?.port();
            serve_hub(hub, world)?;
            format!("127.0.0.1:{port}")
        }
    };
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut children: Vec<Child> = Vec::with_capacity(devices.len());
    for local in 0..devices.len() {
        let rank = args.node_rank * devices.len() + local;
        let child = Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .env(ENV_RANK, rank.to_string())
            .env(ENV_WORLD, world.to_string())
            .env(ENV_LOCAL_RANK, local.to_string())
            .env(ENV_ORCHESTRATOR, &orchestrator)
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

/// Serves the job's hub on `listener` (in a thread, for the life of this process): waits for the
/// `world` peers to connect, then, for each operation, reads one vector from every peer, adds
/// them in rank order and sends the sum back to each. When a peer disconnects or misbehaves, it
/// closes every connection, so the others fail instead of waiting.
fn serve_hub(listener: TcpListener, world: usize) -> Result<()> {
    listener.set_nonblocking(true).map_err(|e| Error::io("orchestrator socket", e))?;
    std::thread::spawn(move || {
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while peers.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                return close_all(peers.iter().flatten());
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Some((rank, stream)) = greeting(stream, world)
                        && peers[rank].is_none()
                    {
                        peers[rank] = Some(stream);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
        let (mut sum, mut buf) = (Vec::new(), Vec::new());
        loop {
            for rank in 0..world {
                if read_vec(&mut peers[rank], &mut buf).is_err() || (rank > 0 && buf.len() != sum.len()) {
                    return close_all(&peers);
                }
                if rank == 0 {
                    std::mem::swap(&mut sum, &mut buf);
                } else {
                    sum.iter_mut().zip(&buf).for_each(|(s, v)| *s += v);
                }
            }
            if peers.iter_mut().any(|p| write_vec(p, &sum).is_err()) {
                return close_all(&peers);
            }
        }
    });
    Ok(())
}

/// Reads a peer's greeting (`HELLO`, rank, world size) on a fresh connection.
fn greeting(mut stream: TcpStream, world: usize) -> Option<(usize, TcpStream)> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut hello = [0u8; 12];
    stream.read_exact(&mut hello).ok()?;
    let word = |i: usize| u32::from_le_bytes([hello[4 * i], hello[4 * i + 1], hello[4 * i + 2], hello[4 * i + 3]]);
    let (rank, w) = (word(1) as usize, word(2) as usize);
    if word(0) != HELLO || w != world || rank >= world {
        let _ = stream.shutdown(Shutdown::Both);
        return None;
    }
    stream.set_read_timeout(None).ok()?;
    stream.set_nodelay(true).ok()?;
    Some((rank, stream))
}

fn close_all<'a>(peers: impl IntoIterator<Item = &'a TcpStream>) {
    for p in peers {
        let _ = p.shutdown(Shutdown::Both);
    }
}

/// Sends `v` as its length (u64) and its values (f32), little-endian.
fn write_vec(stream: &mut TcpStream, v: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * v.len());
    bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
    v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes()));
    stream.write_all(&bytes)?;
    stream.flush()
}

/// Reads a vector written by [`write_vec`] into `out`.
fn read_vec(stream: &mut TcpStream, out: &mut Vec<f32>) -> std::io::Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len)).ok().filter(|&n| n <= 1 << 32);
    let len = len.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "vector length out of range"))?;
    let mut bytes = vec![0u8; 4 * len];
    stream.read_exact(&mut bytes)?;
    out.clear();
    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    Ok(())
}

/// This process's connection to the hub (a process is one peer).
static LINK: Mutex<Option<TcpStream>> = Mutex::new(None);

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
                    let deadline = Instant::now() + FAILURE_GRACE;
                    while Instant::now() < deadline && children.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
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
        Self { rank: 0, world: 1, local_rank: 0, orchestrator: None }
    }

    /// The peer a launcher started (its environment), if this process is one.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(rank) = std::env::var(ENV_RANK) else { return Ok(None) };
        let var = |k: &'static str| std::env::var(k).map_err(|_| bad(k, "", format!("missing while {ENV_RANK} is set")));
        let num = |k: &'static str, v: String| v.parse::<usize>().map_err(|_| bad(k, &v, "not a number"));
        let (world, local_rank) = (num(ENV_WORLD, var(ENV_WORLD)?)?, num(ENV_LOCAL_RANK, var(ENV_LOCAL_RANK)?)?);
        let rank = num(ENV_RANK, rank)?;
        if rank >= world {
            return Err(bad(ENV_RANK, rank, format!("must be below {ENV_WORLD} = {world}")));
        }
        Ok(Some(Self { rank, world, local_rank, orchestrator: Some(var(ENV_ORCHESTRATOR)?) }))
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
    pub fn sum<B: Backend>(&self, values: &mut [f64], _device: &B::Device) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let out = self.exchange(values.iter().map(|&v| v as f32).collect())?;
        for (s, v) in values.iter_mut().zip(out) {
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

    /// One all-reduce (sum) of a 1-D tensor over the peers.
    fn sum_flat<B: Backend>(&self, flat: Tensor<B, 1>, device: &B::Device) -> Result<Tensor<B, 1>> {
        let values = flat.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| self.error(format!("gradients to host: {e:?}")))?;
        let n = values.len();
        Ok(Tensor::from_data(TensorData::new(self.exchange(values)?, [n]), device))
    }

    /// Sends `values` to the hub and returns the sum over the peers (connecting on first use).
    fn exchange(&self, values: Vec<f32>) -> Result<Vec<f32>> {
        let hub = self.orchestrator.as_deref().ok_or_else(|| self.error("no orchestrator address".into()))?;
        let mut link = LINK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stream = match link.as_mut() {
            Some(s) => s,
            None => link.insert(self.connect(hub)?),
        };
        let mut out = Vec::new();
        let sent = write_vec(stream, &values).and_then(|()| read_vec(stream, &mut out));
        if let Err(e) = sent {
            *link = None;
            return Err(self.error(format!("the orchestrator at {hub} closed the connection ({e}): another peer failed or stopped")));
        }
        if out.len() != values.len() {
            return Err(self.error(format!("the peers sent vectors of different lengths (this one {})", values.len())));
        }
        Ok(out)
    }

    /// Connects to the hub and greets it, retrying until [`JOIN_TIMEOUT`] (node 0 may start later).
    fn connect(&self, hub: &str) -> Result<TcpStream> {
        let deadline = Instant::now() + JOIN_TIMEOUT;
        let mut stream = loop {
            match TcpStream::connect(hub) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(self.error(format!("cannot reach the orchestrator at {hub} within {} s: {e}", JOIN_TIMEOUT.as_secs())));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let hello: Vec<u8> = [HELLO, self.rank as u32, self.world as u32].iter().flat_map(|w| w.to_le_bytes()).collect();
        stream.set_nodelay(true).and_then(|()| stream.write_all(&hello)).map_err(|e| self.error(format!("greeting the orchestrator at {hub}: {e}")))?;
        Ok(stream)
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
        Peer { rank, world, local_rank: rank, orchestrator: None }
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

    fn join(port: u16, rank: u32, world: u32) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&[HELLO, rank, world].iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        s
    }

    #[test]
    fn the_hub_sums_in_rank_order_and_drops_everyone_when_a_peer_leaves() {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = hub.local_addr().unwrap().port();
        serve_hub(hub, 3).unwrap();
        // peers join in any order; a stranger (wrong world size) is turned away
        let mut stranger = join(port, 0, 2);
        let mut peers = [2, 0, 1].map(|r| (r, join(port, r, 3)));
        let mut buf = Vec::new();
        assert!(read_vec(&mut stranger, &mut buf).is_err());
        for round in 0..3 {
            for (r, p) in &mut peers {
                write_vec(p, &[*r as f32 + round as f32, 1e8, 1.0]).unwrap();
            }
            for (_, p) in &mut peers {
                read_vec(p, &mut buf).unwrap();
                // (1e8 + 1e8) + 1e8 in f32, then the 1.0s: the rank order's rounding
                assert_eq!(buf, [3.0 + 3.0 * round as f32, (1e8f32 + 1e8) + 1e8, 3.0]);
            }
        }
        // peer 2 leaves mid-operation: the others get an error, not a hang
        for (_, p) in &mut peers[1..] {
            write_vec(p, &[1.0]).unwrap();
        }
        peers[0].1.shutdown(Shutdown::Both).unwrap();
        for (_, p) in &mut peers[1..] {
            assert!(read_vec(p, &mut buf).is_err());
        }
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
