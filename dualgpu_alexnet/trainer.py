"""The training loop: the coordinator (rank 0) runs data, loss and schedule; every rank a device.

One step, in order (on one process every collective is an identity):

1. the coordinator broadcasts the learning rate and the batch as uint8 crops plus per-image crop
   offsets, flips and colour noise; each device rebuilds the float input (`share_batch`);
2. forward through this rank's half of the net (all-gathers at conv3, fc6, fc7, fc8); the logits
   are gathered at the coordinator, which computes the loss and scatters the logit gradients;
3. backward (reduce-scatters at the same layers), then one small all-reduce of flags (non-finite
   loss or gradients per layer, stop signals) so every rank takes the same decision;
4. every device updates its own shard with the paper's SGD rule.

Everything random is a function of (seed, step), so a resumed run repeats a straight one exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .comm import Comm
from .config import Config, ConfigError
from .data import Batch, DataStats, Prefetcher, open_data, to_input, train_batch
from .evaluate import evaluate
from .init import init_shard
from .layers import softmax_cross_entropy
from .metrics import JsonlWriter, topk_errors
from .model import Net
from .optim import SGD, LRSchedule
from .partition import check_world_size, full_shapes, plan
from .reporting import Reporter
from .runtime import StopFlag, current_rss_mib, peak_rss_mib
from .sharing import bcast_ints, share_batch, share_stats
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


class Trainer:
    """Everything one rank needs to train; `run()` does the training.

    Args:
        config: the validated run config (for --resume: the run's saved config).
        comm: the model communicator (1 process or model.devices ranks).
        opts: data path, run directory, init/resume, length.
    """

    def __init__(self, config: Config, comm: Comm, opts: RunOptions):
        check_world_size(config, comm.size)
        if opts.steps is not None and opts.steps < 1:  # every rank raises it alike
            raise ConfigError(f"--steps must be >= 1, got {opts.steps}")
        self.config, self.comm, self.opts = config, comm, opts
        self.report = Reporter(comm, quiet=opts.quiet)
        resume_state = self._read_resume() if opts.resume else None
        init_state = (self._load(opts.init, require_checksum=False)  # before the run dir: a bad
                      if opts.init and not opts.resume else None)  # file leaves nothing behind
        if resume_state and opts.data is None:
            self.opts.data = resume_state[1].get("data_path")
        self._open_data()
        self.run_dir = self._prepare_run_dir()
        n_train = len(self.train_ds) if comm.is_coordinator else 0
        total, per_epoch = bcast_ints(comm, [self._total_steps(n_train),
                                             max(1, n_train // config.train.batch_size)], 2,
                                      "setup")
        self.total_steps, self.steps_per_epoch = total, per_epoch
        if opts.resume or opts.init:  # whole weights read at the coordinator, rows scattered
            loaded = resume_state or init_state  # (tensors, meta) at the coordinator only
            self.report.line(f"resuming {opts.resume} from its checkpoint.npz" if opts.resume
                             else f"weights from {opts.init}")
            params = scatter_whole(loaded[0] if loaded else None, config.model, comm)
        else:
            params = init_shard(config.model, config.train.seed, comm.rank, comm.size)
        self.net = Net(config, comm, params)
        self.sgd = SGD(self.net.parameters(), self.net.gradients(), config.optim)
        self.schedule = LRSchedule(config.optim, self.total_steps)
        self.start_step = 0
        if opts.resume:
            self._restore_training_state(resume_state)
        self.stop = StopFlag()
        self.manager = (ckpt.CheckpointManager(self.run_dir, config.train.keep_last)
                        if comm.is_coordinator else None)

    # -- set-up ------------------------------------------------------------------------------

    def _open_data(self) -> None:
        def work():
            train, val, stats = open_data(self.opts.data, self.config)
            if len(train.classes) > self.config.model.num_classes:
                raise ValueError(f"{self.opts.data or 'the synthetic data'} has "
                                 f"{len(train.classes)} classes but "
                                 f"model.num_classes={self.config.model.num_classes}")
            return train, val, stats

        opened = self.comm.on_coordinator(work, (ValueError, OSError))
        self.train_ds, self.val_ds, stats = opened or (None, None, None)
        self.stats: DataStats = share_stats(self.comm, stats, self.config)

    def _prepare_run_dir(self) -> Path | None:
        """Coordinator: the run directory (refusing one that holds another run); None elsewhere."""
        def work() -> Path:
            if self.opts.resume:
                return Path(self.opts.resume)
            out = Path(self.opts.out) if self.opts.out else Path("runs") / (
                f"{self.config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                if out.exists() and (not out.is_dir() or any(out.iterdir())):
                    raise ValueError(f"{out} already holds a run (or is not a folder); pass "
                                     f"--resume {out} to continue it or choose another --out "
                                     "(nothing was overwritten)")
                out.mkdir(parents=True, exist_ok=True)
                (out / "config.toml").write_text(self.config.to_toml())
            except OSError as e:
                raise ValueError(f"cannot create the run directory {out}: {e}") from None
            return out

        return self.comm.on_coordinator(work)

    def _total_steps(self, n_train: int) -> int:
        opts, t = self.opts, self.config.train
        if opts.steps is not None:
            return opts.steps
        if t.steps > 0:
            return t.steps
        if opts.data is None and opts.epochs is None:
            return t.demo_steps
        epochs = opts.epochs if opts.epochs is not None else t.epochs
        return max(1, math.ceil(epochs * n_train / t.batch_size))

    def _load(self, path: str | Path, require_checksum: bool) -> tuple[dict, dict] | None:
        """Coordinator: read and shape-check a checkpoint; the same clear error on every rank."""
        def work() -> tuple[dict, dict]:
            tensors, meta = ckpt.load_checkpoint(path, require_checksum=require_checksum)
            ckpt.check_shapes(tensors, full_shapes(self.config.model), path)
            return tensors, meta

        return self.comm.on_coordinator(work)

    def _read_resume(self) -> tuple[dict, dict] | None:
        return self._load(Path(self.opts.resume) / ckpt.LATEST_NAME, require_checksum=True)

    def _restore_training_state(self, resume_state) -> None:
        tensors, meta = resume_state if resume_state else (None, {})
        self.sgd.load_state_dict(scatter_whole(tensors, self.config.model, self.comm,
                                               prefix=ckpt.MOMENTUM_PREFIX))
        schedule = json.loads(self.comm.bcast_text(meta.get("schedule_json", "{}"), "resume"))
        step, total = bcast_ints(self.comm, [meta.get("step", 0),
                                             meta.get("total_steps", 0)], 2, "resume")
        if self.opts.steps is None and self.opts.epochs is None:
            self.total_steps = total
        if self.total_steps <= step:  # every rank knows both numbers: an agreed error
            raise ConfigError(f"{self.opts.resume} is at step {step} already; pass --steps "
                              f"above {step} to train further (nothing was changed)")
        self.schedule = LRSchedule(self.config.optim, self.total_steps)
        self.schedule.load_state_dict(schedule)
        self.start_step = step

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, step: int) -> Path | None:
        """Gather the whole model and momentum at the coordinator and write a checkpoint."""
        model = gather_whole(self.net.parameters(), self.config.model, self.comm)
        momentum = gather_whole(self.sgd.velocity, self.config.model, self.comm,
                                prefix=ckpt.MOMENTUM_PREFIX)
        self.comm.take_events()  # checkpoint traffic is not the next step's comm_mb
        if not self.comm.is_coordinator:
            return None
        stats = {"data.mean_image": self.stats.mean_image, "data.eigval": self.stats.eigval,
                 "data.eigvec": self.stats.eigvec}
        meta = {"step": step, "total_steps": self.total_steps, "config": self.config.to_toml(),
                "schedule_json": json.dumps(self.schedule.state_dict()),
                "world_size": self.comm.size, "data_path": self.opts.data,
                "data_position": step * self.config.train.batch_size,
                "classes": list(self.train_ds.classes)}
        self.manager.save(step, {**model, **momentum, **stats}, meta)
        return self.run_dir / ckpt.LATEST_NAME

    # -- the loop ----------------------------------------------------------------------------

    def _fault(self, step: int, when: str) -> None:
        """Fault injection for tests (train.fail_at_step / fail_on_rank / fail_mode)."""
        t = self.config.train
        if step != t.fail_at_step or self.comm.rank != t.fail_on_rank:
            return
        if when == "start" and t.fail_mode == "raise":
            raise RuntimeError(f"injected fault at step {step} on rank {self.comm.rank}")
        if when == "start" and t.fail_mode == "exit":
            os._exit(17)
        if when == "start" and t.fail_mode == "hang":
            time.sleep(10**6)
        if when == "backward" and t.fail_mode == "nan":
            next(iter(self.net.layer_grads("fc7"))).flat[0] = np.nan

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
        self._fault(step, "backward")
        layers = [p.name for p in plan(cfg.model)]
        bad_grads = [float(not all(np.isfinite(g.sum()) for g in net.layer_grads(name)))
                     for name in layers]
        bad_loss = float(comm.is_coordinator and not np.isfinite(loss))
        flags = comm.allreduce_max(np.array([bad_loss, float(self.stop.requested), *bad_grads]))
        if flags[0] or any(flags[2:]):
            bad = [name for name, flag in zip(layers, flags[2:], strict=True) if flag]
            where = "the loss" if flags[0] else "the gradients of " + ", ".join(bad)
            raise NonFiniteError(f"non-finite values in {where} at step {step + 1}; stopped "
                                 "every rank without saving (the last checkpoint is intact)")
        self.sgd.step(lr)
        net.zero_grad()
        return {"loss": loss, "top1_err": top1, "stop": bool(flags[1])}

    def _record(self, step: int, out: dict, lr: float, seconds: float, wait: float) -> dict:
        events = self.comm.take_events()
        nbytes = self.comm.allreduce_sum(np.array([sum(e.nbytes for e in events)]))[0]
        mine = sum(e.seconds for e in events)  # inside collectives, waiting included
        most, least = self.comm.allreduce_max(np.array([mine, -mine]))
        return {"step": step, "loss": out["loss"], "top1_err": out["top1_err"], "lr": lr,
                "seconds": seconds, "images_per_s": self.config.train.batch_size / seconds,
                "comm_seconds": float(most), "comm_seconds_min": float(-least),
                "comm_mb": float(nbytes) / 1e6,
                "data_wait": wait, "rss_mib": current_rss_mib()}

    def _checkpoint_due(self, step: int, last_save: float) -> bool:
        t = self.config.train
        due = bool(t.checkpoint_every and step % t.checkpoint_every == 0) or bool(
            t.checkpoint_minutes and time.monotonic() - last_save > 60 * t.checkpoint_minutes)
        return bool(self.comm.allreduce_max(np.array([float(due)]))[0])

    def run(self) -> dict:
        """Train from start_step to total_steps; returns the final summary on every rank."""
        cfg, comm, report = self.config, self.comm, self.report
        report.header(cfg, self.total_steps, self.steps_per_epoch, self.opts)
        eval_every = cfg.train.eval_every or self.steps_per_epoch
        writer = prefetch = None
        if comm.is_coordinator:
            writer = JsonlWriter(self.run_dir / "metrics.jsonl")
            prefetch = Prefetcher(lambda s: train_batch(self.train_ds, self.stats, s, cfg),
                                  self.start_step, cfg.data.prefetch)
        self.stop.install()
        comm.take_events()  # set-up traffic (config, stats, resume state) is not step 1's
        step, stopped, result, last_save = self.start_step, False, {}, time.monotonic()
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                comm.step = step
                self._fault(step, "start")
                batch, wait = prefetch.get(step) if prefetch else (None, 0.0)
                lr = self.schedule.lr(step) if comm.is_coordinator else 0.0
                lr = float(comm.bcast(np.array([lr]) if comm.is_coordinator else None, (1,),
                                      np.float64, "schedule")[0])
                out = self._step(step, batch, lr)
                step += 1
                record = self._record(step, out, lr, time.perf_counter() - t0, wait)
                if writer:
                    writer.write(record)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    report.step(record, self.total_steps)
                if step % eval_every == 0 or step == self.total_steps:
                    result = evaluate(self.net, comm, self.val_ds, self.stats, cfg,
                                      limit=cfg.train.eval_batches)
                    if comm.is_coordinator:
                        if step % eval_every == 0:  # not the extra one at the end: a run
                            self.schedule.observe(result["top1_err"])  # cut short resumes same
                        writer.write({"step": step, "kind": "eval", **result})
                    report.eval(step, result)
                if out["stop"]:
                    stopped = True
                    break
                if self._checkpoint_due(step, last_save) and step < self.total_steps:
                    self.save(step)
                    last_save = time.monotonic()
        finally:
            if prefetch:
                prefetch.close()
            if writer:
                writer.close()
            self.stop.restore()
        path = self.save(step)
        peak = float(comm.allreduce_max(np.array([peak_rss_mib()]))[0])
        summary = {**result, "steps": step, "checkpoint": str(path) if path else None,
                   "peak_rss_mib": peak, "run_dir": str(self.run_dir) if self.run_dir else None}
        if stopped:
            launcher = f"mpirun -n {comm.size} " if comm.size > 1 else ""
            report.line(f"stopped by {self.stop.signal_name} at step {step}; saved {path}. "
                        f"Resume with: {launcher}python -m launch.train --resume {self.run_dir}")
            raise TrainingInterrupted(f"stopped by {self.stop.signal_name} at step {step}")
        report.final(summary)
        return summary
