"""The training loop: the coordinator (rank 0) runs data, loss and schedule; every rank a device.

One step, in order (on one process every collective is an identity):

1. the coordinator broadcasts the step header (learning rate, batch size) and the batch as uint8
   crops plus per-image crop offsets, flips and colour noise; each device rebuilds the float input;
2. forward through this rank's half of the net (all-gathers at conv3, fc6, fc7, fc8); the logits
   are gathered at the coordinator, which computes the loss and scatters the logit gradients;
3. backward (reduce-scatters at the same layers), then one small all-reduce of flags (non-finite
   loss or gradients per layer, stop signals) so every rank takes the same decision;
4. every device updates its own shard with the paper's SGD rule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .comm import Comm
from .config import Config
from .data import Batch, DataStats, Prefetcher, open_data, to_input, train_batch
from .evaluate import evaluate, share_stats
from .init import init_shard
from .layers import softmax_cross_entropy
from .metrics import JsonlWriter, topk_errors
from .model import Net
from .optim import SGD, LRSchedule
from .partition import check_world_size, plan
from .reporting import Reporter
from .runtime import StopFlag, current_rss_mib, peak_rss_mib
from .state import gather_whole, scatter_whole


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or Inf; every rank stops together."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM: the run stopped at a step boundary after saving."""


@dataclass
class RunOptions:
    """What the command line adds to the config."""

    data: str | None = None  # image folder or prepared cache; None = embedded synthetic data
    out: str | None = None  # run directory (default: runs/<preset>-<time>)
    init: str | None = None  # start from the weights of this checkpoint
    resume: str | None = None  # continue this run directory exactly
    steps: int | None = None  # training length in steps (overrides the config)
    epochs: float | None = None  # training length in epochs (overrides the config)
    quiet: bool = False  # no progress lines


def _agree(comm: Comm, error: str | None) -> None:
    """Raise the coordinator's error (a clear message) on every rank, or nothing."""
    text = comm.bcast_text(error or "", "error")
    if text:
        raise ValueError(text)


def _prepare_run_dir(config: Config, opts: RunOptions) -> tuple[Path | None, str | None]:
    """Coordinator only: the run directory, or the reason it cannot be used."""
    if opts.resume:
        return Path(opts.resume), None
    out = Path(opts.out) if opts.out else Path("runs") / (
        f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        return None, (f"{out} already holds files of a run; pass --resume {out} to continue it "
                      "or choose another --out (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config.to_toml())
    return out, None


def _total_steps(config: Config, opts: RunOptions, n_train: int) -> int:
    if opts.steps is not None:
        return opts.steps
    if config.train.steps > 0:
        return config.train.steps
    if opts.data is None and opts.epochs is None:
        return config.train.demo_steps
    epochs = opts.epochs if opts.epochs is not None else config.train.epochs
    return max(1, math.ceil(epochs * n_train / config.train.batch_size))


def share_batch(comm: Comm, batch: Batch | None, input_size: int) -> Batch:
    """The coordinator's batch on every rank (labels stay at the coordinator)."""
    n = comm.bcast(np.array([0 if batch is None else len(batch.images)], np.int64), (1,),
                   np.int64, "batch")
    n = int(n[0])
    images = comm.bcast(None if batch is None else np.ascontiguousarray(batch.images),
                        (n, input_size, input_size, 3), np.uint8, "batch")
    aux = None
    if batch is not None:
        aux = np.concatenate([batch.offsets.astype(np.float32), batch.flips[:, None],
                              batch.noise], axis=1).astype(np.float32)
    aux = comm.bcast(aux, (n, 6), np.float32, "batch")
    if batch is not None:
        return batch
    return Batch(images=images, offsets=aux[:, :2].astype(np.int32), flips=aux[:, 2] > 0.5,
                 noise=np.ascontiguousarray(aux[:, 3:]), labels=np.zeros(n, np.int64))


class Trainer:
    """Everything one rank needs to train; `run()` does the training.

    Args:
        config: the validated run config (for --resume: the run's saved config).
        comm: the model communicator (1 process or model.devices ranks).
        opts: data path, run directory, init/resume, length.
    """

    def __init__(self, config: Config, comm: Comm, opts: RunOptions):
        check_world_size(config, comm.size)
        self.config, self.comm, self.opts = config, comm, opts
        self.report = Reporter(comm, quiet=opts.quiet)
        self.train_ds = self.val_ds = None
        error, stats = None, None
        if comm.is_coordinator:
            try:
                self.train_ds, self.val_ds, stats = open_data(opts.data, config)
                classes = len(self.train_ds.classes)
                if classes > config.model.num_classes:
                    error = (f"{opts.data or 'synthetic data'} has {classes} classes but "
                             f"model.num_classes={config.model.num_classes}")
            except (ValueError, OSError) as e:
                error = str(e)
        _agree(comm, error)
        self.stats: DataStats = share_stats(comm, stats, config)
        self.run_dir, error = None, None
        if comm.is_coordinator:
            try:
                self.run_dir, error = _prepare_run_dir(config, opts)
            except OSError as e:
                error = f"cannot create the run directory: {e}"
        _agree(comm, error)
        n_train = len(self.train_ds) if comm.is_coordinator else 0
        self.steps_per_epoch = max(1, n_train // config.train.batch_size)
        header = np.array([_total_steps(config, opts, n_train), self.steps_per_epoch], np.int64)
        header = comm.bcast(header if comm.is_coordinator else None, (2,), np.int64, "setup")
        self.total_steps, self.steps_per_epoch = int(header[0]), int(header[1])
        self.start_step = 0
        params = self._initial_params()
        self.net = Net(config, comm, params)
        self.sgd = SGD(self.net.parameters(), self.net.gradients(), config.optim)
        self.schedule = LRSchedule(config.optim, self.total_steps)
        if opts.resume:
            self._restore_optimizer()
        self.stop = StopFlag()
        self.manager = (ckpt.CheckpointManager(self.run_dir, config.train.keep_last)
                        if comm.is_coordinator else None)

    # -- state -----------------------------------------------------------------------------

    def _load_whole(self, path: str, require_checksum: bool) -> dict | None:
        """Read a checkpoint at the coordinator; raise the same clear error on every rank."""
        whole, error = None, None
        if self.comm.is_coordinator:
            try:
                tensors, meta = ckpt.load_checkpoint(path, require_checksum=require_checksum)
                expected = {f"{p.name}.{k}": s for p in plan(self.config.model)
                            for k, s in ((("weight", p.weight_shape), ("bias", (p.c_out,))))}
                ckpt.check_shapes({k: v for k, v in tensors.items() if ckpt.is_model_key(k)},
                                  expected, path)
                whole = (tensors, meta)
            except ValueError as e:
                error = str(e)
        _agree(self.comm, error)
        return whole

    def _initial_params(self) -> dict[str, np.ndarray]:
        m, opts = self.config.model, self.opts
        source = (str(Path(opts.resume) / ckpt.LATEST_NAME) if opts.resume else opts.init)
        if source is None:
            return init_shard(m, self.config.train.seed, self.comm.rank, self.comm.size)
        loaded = self._load_whole(source, require_checksum=bool(opts.resume))
        tensors, meta = loaded if loaded else ({}, {})
        self._resume_meta = meta
        self.report.line(f"weights from {source}")
        return scatter_whole(tensors, m, self.comm)

    def _restore_optimizer(self) -> None:
        meta = self._resume_meta if self.comm.is_coordinator else {}
        tensors = None
        if self.comm.is_coordinator:
            tensors, _ = ckpt.load_checkpoint(Path(self.opts.resume) / ckpt.LATEST_NAME)
        momentum = scatter_whole(tensors, self.config.model, self.comm, prefix="momentum.")
        self.sgd.load_state_dict(momentum)
        state = self.comm.bcast_text(meta.get("schedule_json", "{}") if meta else "{}",
                                     "resume")
        self.schedule.load_state_dict(json.loads(state))
        step = np.array([meta.get("step", 0) if meta else 0], np.int64)
        self.start_step = int(self.comm.bcast(step if self.comm.is_coordinator else None,
                                              (1,), np.int64, "resume")[0])
        total = np.array([meta.get("total_steps", self.total_steps) if meta else 0], np.int64)
        if self.opts.steps is None:
            self.total_steps = int(self.comm.bcast(total if self.comm.is_coordinator else None,
                                                   (1,), np.int64, "resume")[0])
        self.schedule = self._with_total(self.schedule)

    def _with_total(self, schedule: LRSchedule) -> LRSchedule:
        fresh = LRSchedule(self.config.optim, self.total_steps)
        fresh.load_state_dict(schedule.state_dict())
        return fresh

    def save(self, step: int) -> Path | None:
        """Gather the whole model and momentum at the coordinator and write a checkpoint."""
        model = gather_whole(self.net.parameters(), self.config.model, self.comm)
        momentum = gather_whole(self.sgd.velocity, self.config.model, self.comm,
                                prefix="momentum.")
        if not self.comm.is_coordinator:
            return None
        meta = {"step": step, "total_steps": self.total_steps, "config": self.config.to_toml(),
                "schedule_json": json.dumps(self.schedule.state_dict()),
                "world_size": self.comm.size, "data": self.opts.data or "synthetic",
                "data_position": step * self.config.train.batch_size}
        return self.manager.save(step, {**model, **momentum}, meta)

    # -- the loop ----------------------------------------------------------------------------

    def _step(self, step: int, batch: Batch | None, lr: float) -> dict:
        comm, net, cfg = self.comm, self.net, self.config
        shared = share_batch(comm, batch, cfg.model.input_size)
        x = to_input(shared, self.stats, cfg, dtype=np.dtype(cfg.model.dtype))
        logits = net.forward(x, train=True, step=step)
        loss, top1, dlogits = math.nan, math.nan, None
        if comm.is_coordinator:
            loss, dlogits = softmax_cross_entropy(logits, batch.labels)
            top1 = topk_errors(logits, batch.labels, ks=(1,))[1]
        net.backward(dlogits)
        layers = [p.name for p in plan(cfg.model)]
        bad_grads = [float(not all(np.isfinite(g.sum()) for g in net.layer_grads(name)))
                     for name in layers]
        bad_loss = float(comm.is_coordinator and not np.isfinite(loss))
        flags = comm.allreduce_max(np.array([bad_loss, float(self.stop.requested), *bad_grads]))
        if flags[0] or any(flags[2:]):
            layers = [name for name, bad in zip(layers, flags[2:]) if bad]
            where = "the loss" if flags[0] else "the gradients of " + ", ".join(layers)
            raise NonFiniteError(f"non-finite values in {where} at step {step}; stopping "
                                 "without saving (the last good checkpoint is intact)")
        self.sgd.step(lr)
        net.zero_grad()
        return {"loss": loss, "top1_err": top1, "stop": bool(flags[1])}

    def run(self) -> dict:
        """Train from start_step to total_steps; returns the final summary (at every rank)."""
        cfg, comm, report = self.config, self.comm, self.report
        report.header(cfg, self.total_steps, self.steps_per_epoch, self.opts)
        self.stop.install()
        eval_every = cfg.train.eval_every or self.steps_per_epoch
        writer = JsonlWriter(self.run_dir / "metrics.jsonl") if comm.is_coordinator else None
        prefetch = None
        if comm.is_coordinator:
            prefetch = Prefetcher(lambda s: train_batch(self.train_ds, self.stats, s, cfg),
                                  self.start_step, cfg.data.prefetch)
        last_save = time.monotonic()
        step, stopped, summary = self.start_step, False, {}
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                comm.step = step
                batch, wait = prefetch.get(step) if prefetch else (None, 0.0)
                lr = self.schedule.lr(step) if comm.is_coordinator else 0.0
                lr = float(comm.bcast(np.array([lr]) if comm.is_coordinator else None, (1,),
                                      np.float64, "schedule")[0])
                if step == cfg.train.fail_at_step and comm.rank == cfg.train.fail_on_rank:
                    raise RuntimeError(f"injected fault (train.fail_at_step={step}, "
                                       f"train.fail_on_rank={comm.rank})")
                out = self._step(step, batch, lr)
                step += 1
                seconds = time.perf_counter() - t0
                events = comm.take_events()
                totals = comm.allreduce_sum(np.array([sum(e.nbytes for e in events)]))
                comm_max = comm.allreduce_max(np.array([sum(e.seconds for e in events)]))
                record = {"step": step, "loss": out["loss"], "top1_err": out["top1_err"],
                          "lr": lr, "seconds": seconds,
                          "images_per_s": cfg.train.batch_size / seconds,
                          "comm_seconds": float(comm_max[0]), "comm_mb": totals[0] / 1e6,
                          "data_wait": wait, "rss_mib": current_rss_mib()}
                if writer:
                    writer.write(record)
                report.step(record, self.total_steps)
                if step % eval_every == 0 or step == self.total_steps:
                    result = evaluate(self.net, comm, self.val_ds, self.stats, cfg,
                                      limit=cfg.train.eval_batches)
                    if comm.is_coordinator:
                        self.schedule.observe(result["top1_err"])
                        writer.write({"step": step, "kind": "eval", **result})
                    report.eval(step, result)
                    summary = result
                minutes = cfg.train.checkpoint_minutes
                due = (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) \
                    or (minutes and time.monotonic() - last_save > 60 * minutes)
                due = comm.allreduce_max(np.array([float(bool(due))]))[0]
                if out["stop"]:
                    stopped = True
                    break
                if due and step < self.total_steps:
                    self.save(step)
                    last_save = time.monotonic()
        finally:
            if prefetch:
                prefetch.close()
            if writer:
                writer.close()
            self.stop.restore()
        path = self.save(step)
        peak = comm.allreduce_max(np.array([peak_rss_mib()]))[0]
        summary = {**summary, "steps": step, "checkpoint": str(path) if path else None,
                   "peak_rss_mib": peak, "run_dir": str(self.run_dir) if self.run_dir else None}
        if stopped:
            report.line(f"stopped by {self.stop.signal_name} at step {step}; saved "
                        f"{self.run_dir}/checkpoint.npz. Resume with: "
                        f"python -m launch.train --resume {self.run_dir}"
                        + (f" (under mpirun -n {comm.size})" if comm.size > 1 else ""))
            raise TrainingInterrupted(f"stopped by {self.stop.signal_name} at step {step}")
        report.final(summary)
        return summary
