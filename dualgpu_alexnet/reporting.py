"""What the user sees: the coordinator alone prints a header, progress lines and a summary."""

from __future__ import annotations

import sys

from .comm import Comm
from .config import Config
from .partition import lrn_halo, plan


class Reporter:
    """Prints on the coordinator only; silent elsewhere and when quiet."""

    def __init__(self, comm: Comm, quiet: bool = False, stream=None):
        self.active = comm.is_coordinator and not quiet
        self.world = comm.size
        self.stream = stream or sys.stdout

    def line(self, text: str) -> None:
        if self.active:
            print(text, file=self.stream, flush=True)

    def header(self, config: Config, total_steps: int, steps_per_epoch: int, opts) -> None:
        m = config.model
        where = ("one process (collectives are identities)" if self.world == 1
                 else f"{self.world} ranks, one device each; rank 0 also coordinates")
        self.line(f"dualgpu_alexnet | preset {m.name} | {m.devices} device(s) on {where}")
        crossing = [f"{p.name} {p.crossing_floats:,}" for p in plan(m) if p.crossing_floats]
        crossing = [f"{p.name} LRN halo {h * side * side:,}"
                    for p in plan(m) for h, side in [lrn_halo(m, p)] if h] + crossing
        if crossing and self.world > 1:
            self.line("crossing devices per image per direction (floats): "
                      + ", ".join(crossing) + "; logits gathered at the coordinator")
        self.line(f"data {opts.data or 'embedded synthetic'} | batch {config.train.batch_size} | "
                  f"{total_steps} steps ({steps_per_epoch} per epoch) | "
                  f"schedule {config.optim.schedule} from lr {config.optim.lr:g}")

    def step(self, r: dict, total_steps: int) -> None:
        if not self.active:
            return
        seconds = r["seconds"] or 1.0
        most, least = (100 * r[k] / seconds for k in ("comm_seconds", "comm_seconds_min"))
        share = f"{most:.1f}%" if self.world == 1 else f"{least:.1f}-{most:.1f}%"
        self.line(f"step {r['step']:>6}/{total_steps} | loss {r['loss']:.4f} | "
                  f"top-1 err {r['top1_err']:.3f} | lr {r['lr']:.2e} | "
                  f"{r['images_per_s']:.1f} img/s | comm {share} ({r['comm_mb']:.1f} MB) | "
                  f"data wait {100 * r['data_wait'] / seconds:.1f}%")

    def eval(self, step: int, result: dict) -> None:
        self.line(f"  validation at step {step}: top-1 err {result['top1_err']:.3f}, "
                  f"top-5 err {result['top5_err']:.3f} ({result['images']} images)")

    def final(self, summary: dict) -> None:
        self.line(f"done: {summary['steps']} steps; checkpoint {summary['checkpoint']}; "
                  f"peak memory per rank {summary['peak_rss_mib']:.0f} MiB")


def summary_table(config: Config) -> str:
    """Per-layer, per-device table: output shape, parameters, multiply-adds, crossing floats."""
    m = config.model
    rows = [("layer", "input from", "output per device", "params/device", "MACs/image/device",
             "crossing floats/image")]
    totals = [0, 0, 0]
    for p in plan(m):
        share = m.devices if p.owner == "split" else 1
        c_dev = p.c_out // share
        shape = f"{c_dev}x{p.post_hw}x{p.post_hw}" if p.spec.kind == "conv" else f"{c_dev}"
        where = p.owner if p.owner != "split" else f"{m.devices} device(s)"
        params, macs = p.params // share, p.macs // share
        totals[0] += p.params
        totals[1] += p.macs
        totals[2] += p.crossing_floats
        halo, side = lrn_halo(m, p)
        parts = [f"{p.crossing_floats:,}"] if p.crossing_floats else []
        if halo:
            parts.append(f"LRN halo {halo * side * side:,}")
            totals[2] += halo * side * side
        crossing = " + ".join(parts) or "-"
        rows.append((p.name, f"{p.spec.input}", f"{shape} ({where})", f"{params:,}",
                     f"{macs:,}", crossing))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    per_image_bytes = totals[2] * 4
    lines += ["",
              f"preset {m.name}: {totals[0]:,} parameters in all "
              f"({totals[0] * 4 / 2**20:.1f} MiB float32), {totals[1]:,} forward multiply-adds "
              f"per image (training ~{6 * totals[1] / 1e9:.2f} GFLOP per image)",
              f"crossing per image per direction: {totals[2]:,} floats = {per_image_bytes:,} "
              f"bytes; per {config.train.batch_size}-image step, forward + backward: "
              f"{2 * per_image_bytes * config.train.batch_size / 1e6:.2f} MB each way"]
    return "\n".join(lines)
