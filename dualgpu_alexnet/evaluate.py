"""Evaluation on the validation set: top-1 / top-5 error, centre crop or the paper's 10 crops.

The coordinator reads the data and computes the errors; every rank runs its half of the net on the
batches it is sent (test mode: no dropout masks, paper-style dropout scales by 1 - p).
"""

from __future__ import annotations

import numpy as np

from .comm import Comm
from .config import Config
from .data import Dataset, DataStats, average_views, eval_batches, to_input
from .layers import softmax
from .metrics import topk_errors
from .model import Net
from .sharing import share_batch


def evaluate(net: Net, comm: Comm, val: Dataset | None, stats: DataStats, config: Config,
             crops: str = "center", limit: int = 0) -> dict[str, float]:
    """Top-1 and top-5 error of `net` on `val` (given at the coordinator; None elsewhere).

    Args:
        crops: "center" (one centre crop) or "ten" (4 corners + centre and their flips,
            softmax averaged over the 10 views).
        limit: evaluate at most this many batches (0 = all).
    Returns:
        {"top1_err", "top5_err", "images"} on every rank (NaN off the coordinator).
    """
    views = 10 if crops == "ten" else 1
    batch_size = max(views, config.train.batch_size // views * views)
    batches = (eval_batches(val, batch_size, crops=crops, limit=limit)
               if comm.is_coordinator else None)
    scores, labels = [], []
    while True:
        batch = next(batches, None) if batches is not None else None
        more = comm.bcast(np.array([batch is not None], np.int64) if comm.is_coordinator
                          else None, (1,), np.int64, "eval")
        if not more[0]:
            break
        shared = share_batch(comm, batch, config.model.input_size)
        x = to_input(shared, stats, config, dtype=np.dtype(config.model.dtype))
        logits = net.forward(x, train=False)
        if comm.is_coordinator:
            probs = softmax(logits.astype(np.float64))
            scores.append(average_views(probs, views) if views > 1 else probs)
            labels.append(batch.labels[::views] if views > 1 else batch.labels)
    comm.take_events()
    if not comm.is_coordinator or not scores:
        return {"top1_err": float("nan"), "top5_err": float("nan"), "images": 0}
    errors = topk_errors(np.concatenate(scores), np.concatenate(labels), ks=(1, 5))
    return {"top1_err": errors[1], "top5_err": errors[5], "images": int(sum(map(len, labels)))}
