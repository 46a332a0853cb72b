//! Data-parallel training over processes on Burn's collective engine (`burn-collective`).
//!
//! Every process (a *peer*) runs the same training loop on the same recipe. Each step, every
//! peer draws the whole global batch (so the data cursor is the same everywhere and any
//! peer's checkpoint resumes all of them) and trains on its own slice of the rows; the
//! gradients, the loss and the step's statistics are then summed over the peers in one
//! all-reduce, so every peer takes the same optimizer step.
//!
//! burn-collective 0.21 has three traits this module works around:
//! - a registration can run only one all-reduce across nodes (the barrier after it never
//!   resets), so each step registers, all-reduces one flat buffer and finishes;
//! - it has no timeouts: a dead or stuck peer leaves the others blocked forever. The calls
//!   run on a worker thread, and the training loop waits for it with a deadline;
//! - a peer that registers again before the orchestrator has seen another's finish can be
//!   answered as if it were alone and "reduce" by itself. Every buffer carries a count of
//!   1.0 per peer, and a sum that is not the world size is an error.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::{TensorData, TensorPrimitive};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register,
};
use burn_communication::Address;
use kiln_recipe::{DistributedSection, Recipe};

use crate::TrainError;
use crate::optim::GradAccumulator;

/// Where this process stands in a data-parallel run, resolved from the recipe's
/// `[distributed]` and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// This process's global rank.
    pub rank: u32,
    /// Processes in the run.
    pub world: u32,
    /// `host:port` of the global orchestrator.
    pub orchestrator: String,
    /// The address the other processes reach this one at.
    pub host: String,
    /// The port of this process's tensor data service.
    pub data_port: u16,
    /// All-reduce strategy across processes.
    pub strategy: String,
    /// How long a step's all-reduce may wait for the peers.
    pub timeout: Duration,
}

/// The first environment variable of `names` that is set, parsed.
fn env_value<T: FromStr>(names: &[&str]) -> Result<Option<T>, TrainError> {
    for name in names {
        if let Ok(v) = std::env::var(name) {
            return v.trim().parse().map(Some).map_err(|_| {
                TrainError::Distributed(format!("environment variable {name}=`{v}` is not valid"))
            });
        }
    }
    Ok(None)
}

impl Topology {
    /// The topology of `recipe`, if it trains data-parallel: the `[distributed]` keys with
    /// `KILN_RANK` (or torchrun's `RANK`), `KILN_ORCHESTRATOR`, `KILN_NODE_HOST` and
    /// `KILN_DATA_PORT` taking precedence.
    pub fn of(recipe: &Recipe) -> Result<Option<Self>, TrainError> {
        let Some(d) = &recipe.distributed else {
            return Ok(None);
        };
        Self::resolve(d, recipe.world()).map(Some)
    }

    fn resolve(d: &DistributedSection, world: u32) -> Result<Self, TrainError> {
        let rank = env_value::<u32>(&["KILN_RANK", "RANK"])?.unwrap_or(d.rank);
        if rank >= world {
            return Err(TrainError::Distributed(format!(
                "rank {rank} is outside 0..{world} (distributed.nodes {} x distributed.devices_per_node {})",
                d.nodes, d.devices_per_node
            )));
        }
        let orchestrator =
            env_value::<String>(&["KILN_ORCHESTRATOR"])?.unwrap_or_else(|| d.orchestrator.clone());
        let host = env_value::<String>(&["KILN_NODE_HOST"])?.unwrap_or_else(|| d.host.clone());
        let loopback = host == "localhost" || host.starts_with("127.");
        // On one host every process needs its own port; across hosts, one per device.
        let offset = if loopback {
            rank
        } else {
            rank % d.devices_per_node.max(1)
        };
        let data_port = match env_value::<u16>(&["KILN_DATA_PORT"])? {
            Some(p) => p,
            None => u16::try_from(u32::from(d.data_port) + offset).map_err(|_| {
                TrainError::Distributed(format!(
                    "distributed.data_port {} + {offset} is not a port",
                    d.data_port
                ))
            })?,
        };
        Ok(Self {
            rank,
            world,
            orchestrator,
            host,
            data_port,
            strategy: d.strategy.clone(),
            timeout: Duration::from_secs_f64(d.timeout_s),
        })
    }

    /// Whether this process writes the run's checkpoints.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }
}

/// What the worker thread answers for one buffer.
type Reply = Result<Vec<f32>, String>;

/// This process's connection to the others: a worker thread that makes the collective
/// calls on backend `B` (the training's, without autodiff), and the deadline the training
/// loop waits for it with.
#[derive(Debug)]
pub struct Peer<B: Backend> {
    topology: Topology,
    jobs: Sender<Vec<f32>>,
    replies: Receiver<Reply>,
    /// Seconds spent waiting for all-reduces so far.
    reduce_s: f64,
    backend: PhantomData<B>,
}

/// Seconds the first all-reduce waits at least: the peers may still be starting (reading
/// and tokenizing their data) when the first one is ready.
const FIRST_CONTACT_S: f64 = 300.0;

impl<B: Backend> Peer<B> {
    /// Starts the worker thread, which reduces on `device`; nothing is sent until the
    /// first [`Self::sum`].
    pub fn start(topology: Topology, device: &B::Device) -> Result<Self, TrainError> {
        let device = device.clone();
        let (jobs, job_rx) = mpsc::channel::<Vec<f32>>();
        let (reply_tx, replies) = mpsc::channel::<Reply>();
        let config = collective_config(&topology)?;
        let rank = topology.rank;
        std::thread::Builder::new()
            .name(format!("kiln-collective-{rank}"))
            .spawn(move || worker::<B>(rank, config, device, job_rx, reply_tx))
            .map_err(|e| TrainError::Distributed(format!("starting the collective worker: {e}")))?;
        Ok(Self {
            topology,
            jobs,
            replies,
            reduce_s: 0.0,
            backend: PhantomData,
        })
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Seconds spent in all-reduces so far (waiting for the peers included).
    pub fn reduce_seconds(&self) -> f64 {
        self.reduce_s
    }

    /// The rows of a global batch of `rows` that this process trains on: contiguous
    /// slices, in rank order, that differ in size by at most one.
    pub fn shard(&self, rows: usize) -> Range<usize> {
        let (r, w) = (self.topology.rank as usize, self.topology.world as usize);
        rows * r / w..rows * (r + 1) / w
    }

    /// The element-wise sum of `values` over all processes; `what` names the exchange in
    /// errors. Fails, rather than blocking, when a peer has not joined within the timeout.
    pub fn sum(&mut self, what: &str, mut values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        let t = &self.topology;
        values.push(1.0); // the count of processes that took part
        let first = self.reduce_s == 0.0;
        let wait = if first {
            t.timeout.max(Duration::from_secs_f64(FIRST_CONTACT_S))
        } else {
            t.timeout
        };
        let started = Instant::now();
        let failed = |why: String| {
            TrainError::Distributed(format!(
                "rank {} of {}: {what}: {why}. Every process must stop now; restart `kiln orchestrator` and `kiln resume` the run on every process to continue from its last checkpoint",
                t.rank, t.world
            ))
        };
        self.jobs
            .send(values)
            .map_err(|_| failed("the collective worker has stopped".to_string()))?;
        let reply = match self.replies.recv_timeout(wait) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                return Err(failed(format!(
                    "not every process joined the all-reduce within {:.0} s (distributed.timeout_s{}): a peer died, hangs, or cannot reach the orchestrator at {}",
                    wait.as_secs_f64(),
                    if first {
                        ", at least 300 s for the first"
                    } else {
                        ""
                    },
                    t.orchestrator
                )));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(failed(
                    "the collective worker stopped (its panic is printed above)".to_string(),
                ));
            }
        };
        let mut out = reply.map_err(|e| failed(format!("the all-reduce failed: {e}")))?;
        self.reduce_s += started.elapsed().as_secs_f64();
        let count = out.pop().unwrap_or(0.0);
        if count != t.world as f32 {
            return Err(failed(format!(
                "{count} processes took part in the all-reduce instead of {} (the orchestrator mixed up two steps; a stale orchestrator from an earlier run does this too)",
                t.world
            )));
        }
        Ok(out)
    }

    /// Checks that every process has the same `values` (e.g. a recipe fingerprint and the
    /// starting step), naming `what` they describe when they differ.
    pub fn agree(&mut self, what: &str, values: &[u32]) -> Result<(), TrainError> {
        // Values are sent as 16-bit pieces, which f32 sums carry exactly.
        let pieces: Vec<f32> = values
            .iter()
            .flat_map(|v| [(v & 0xffff) as f32, (v >> 16) as f32])
            .collect();
        let sums = self.sum(what, pieces.clone())?;
        let world = self.topology.world as f32;
        if sums.iter().zip(&pieces).any(|(s, p)| *s != p * world) {
            return Err(TrainError::Distributed(format!(
                "rank {}: the processes do not agree on {what}: start every process with the same recipe (only `distributed.rank`, `host` and `data_port` may differ) and the same checkpoint",
                self.topology.rank
            )));
        }
        Ok(())
    }
}

fn collective_config(t: &Topology) -> Result<CollectiveConfig, TrainError> {
    let strategy = match t.strategy.as_str() {
        "ring" => AllReduceStrategy::Ring,
        "centralized" => AllReduceStrategy::Centralized,
        _ => AllReduceStrategy::Tree(2),
    };
    // burn-communication reaches addresses only in their WebSocket form.
    let ws = |a: &str| Address::from_str(&format!("ws://{a}")).expect("an infallible parse");
    Ok(CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(t.world)
        .with_global_address(ws(&t.orchestrator))
        .with_node_address(ws(&format!("{}:{}", t.host, t.data_port)))
        .with_data_service_port(t.data_port)
        .with_global_all_reduce_strategy(strategy))
}

/// The worker thread: for each buffer, register, all-reduce (sum) and finish, answering
/// with the sums. Stops at the first failure (burn's collective state is unusable after
/// one) or when the training loop hangs up.
fn worker<B: Backend>(
    rank: u32,
    config: CollectiveConfig,
    device: B::Device,
    jobs: Receiver<Vec<f32>>,
    replies: Sender<Reply>,
) {
    let id = PeerId::from(rank);
    for values in jobs {
        let reply = (|| -> Reply {
            register::<B>(id, device.clone(), config.clone()).map_err(|e| format!("{e:?}"))?;
            let n = values.len();
            let tensor = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &device);
            let summed =
                all_reduce::<B>(id, tensor.into_primitive().tensor(), ReduceOperation::Sum)
                    .map_err(|e| format!("{e:?}"))?;
            finish_collective::<B>(id).map_err(|e| format!("{e:?}"))?;
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
                .into_data()
                .into_vec::<f32>()
                .map_err(|e| format!("{e:?}"))
        })();
        let failed = reply.is_err();
        if replies.send(reply).is_err() || failed {
            return;
        }
    }
}

/// What one step sums over the processes besides the gradients.
#[derive(Debug, Clone, Default)]
pub struct StepSums {
    /// The step's loss (each process's share).
    pub loss: f64,
    /// Auxiliary losses by name.
    pub aux: BTreeMap<String, f64>,
    /// Router usage by router.
    pub usage: BTreeMap<String, Vec<f64>>,
    /// Whether this process was asked to stop (signal).
    pub interrupted: bool,
    /// Whether this process reached its time or step limit.
    pub out_of_time: bool,
}

/// Sums a step's gradients and [`StepSums`] over the processes: `layout` is every
/// trainable parameter with its size, in the same order on every process; a parameter
/// none of the processes has a gradient for stays without one (as in a single process).
/// Router usage is averaged rather than summed.
pub fn reduce_step<B: Backend>(
    peer: &mut Peer<B>,
    step: u64,
    layout: &[(String, usize)],
    acc: &mut GradAccumulator<B>,
    sums: StepSums,
    device: &B::Device,
) -> Result<StepSums, TrainError> {
    let mut grads = acc.take();
    let total: usize = layout.iter().map(|(_, n)| n).sum();
    let mut parts = Vec::with_capacity(layout.len());
    let mut present = Vec::with_capacity(layout.len());
    for (name, n) in layout {
        match grads.remove(name) {
            Some(g) => {
                parts.push(g);
                present.push(1.0f32);
            }
            None => {
                parts.push(Tensor::zeros([*n], device));
                present.push(0.0);
            }
        }
    }
    if let Some(name) = grads.keys().next() {
        return Err(TrainError::Distributed(format!(
            "gradient of `{name}`, which is not a trainable parameter of the model"
        )));
    }
    let mut values = if parts.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(parts, 0)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Distributed(format!("reading the gradients: {e:?}")))?
    };
    values.extend(present);
    values.push(sums.loss as f32);
    values.extend(sums.aux.values().map(|v| *v as f32));
    values.extend(sums.usage.values().flatten().map(|v| *v as f32));
    values.push(f32::from(u8::from(sums.interrupted)));
    values.push(f32::from(u8::from(sums.out_of_time)));
    let reduced = peer.sum(&format!("step {step}"), values)?;

    let world = f64::from(peer.topology().world);
    let (grad_values, rest) = reduced.split_at(total);
    let (present, rest) = rest.split_at(layout.len());
    let flat = Tensor::<B, 1>::from_data(TensorData::new(grad_values.to_vec(), [total]), device);
    let mut at = 0;
    for ((name, n), p) in layout.iter().zip(present) {
        if *p > 0.0 {
            acc.insert(name.clone(), flat.clone().narrow(0, at, *n));
        }
        at += n;
    }
    let mut rest = rest.iter().map(|v| f64::from(*v));
    let mut next = || rest.next().unwrap_or(0.0);
    let loss = next();
    let aux = sums.aux.keys().map(|k| (k.clone(), next())).collect();
    let usage = sums
        .usage
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|_| next() / world).collect()))
        .collect();
    Ok(StepSums {
        loss,
        aux,
        usage,
        interrupted: next() > 0.0,
        out_of_time: next() > 0.0,
    })
}

/// Runs Burn's global orchestrator on `port` (all interfaces) until the process is
/// interrupted. Fails at once when the port is taken (Burn's own server would only log it).
pub fn run_orchestrator(port: u16) -> Result<(), TrainError> {
    std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        TrainError::Distributed(format!(
            "the orchestrator cannot listen on port {port}: {e}"
        ))
    })?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| {
        TrainError::Distributed(format!("starting the orchestrator's runtime: {e}"))
    })?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(rank: u32, world: u32) -> Topology {
        Topology {
            rank,
            world,
            orchestrator: "127.0.0.1:1".to_string(),
            host: "127.0.0.1".to_string(),
            data_port: 2,
            strategy: "tree".to_string(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn shards_cover_the_batch_in_rank_order() {
        for (rows, world) in [(8, 2), (7, 3), (2, 4), (0, 2)] {
            let mut covered = Vec::new();
            for rank in 0..world {
                let (jobs, _) = mpsc::channel();
                let (_, replies) = mpsc::channel();
                let peer = Peer::<burn::backend::Flex> {
                    topology: topology(rank, world),
                    jobs,
                    replies,
                    reduce_s: 0.0,
                    backend: PhantomData,
                };
                let s = peer.shard(rows);
                assert!(s.len() <= rows.div_ceil(world as usize));
                covered.extend(s);
            }
            assert_eq!(
                covered,
                (0..rows).collect::<Vec<_>>(),
                "{rows} rows over {world}"
            );
        }
    }
}
