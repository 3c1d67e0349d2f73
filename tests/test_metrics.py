"""Top-k errors in closed form, the JSON-lines writer's crash behaviour, and the timers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualgpu_alexnet.metrics import (
    JsonlWriter,
    Stopwatch,
    Timer,
    read_jsonl,
    topk_errors,
    true_class_rank,
)

SCORES = np.array([[0.1, 0.7, 0.2],    # true 1: rank 0
                   [0.5, 0.3, 0.2],    # true 1: rank 1
                   [0.6, 0.3, 0.1],    # true 2: rank 2
                   [0.2, 0.2, 0.6]])   # true 0: rank 1 (class 2 is higher)
LABELS = np.array([1, 1, 2, 0])


def test_topk_errors_closed_form_and_k_clipped_to_classes() -> None:
    assert true_class_rank(SCORES, LABELS).tolist() == [0, 1, 2, 1]
    assert topk_errors(SCORES, LABELS, ks=(1, 2, 5)) == {1: 0.75, 2: 0.25, 5: 0.0}


def test_logits_and_probabilities_give_the_same_errors() -> None:
    logits = np.log(SCORES) + 3.0
    assert topk_errors(logits, LABELS, ks=(1, 2)) == topk_errors(SCORES, LABELS, ks=(1, 2))


def test_ties_go_to_the_lower_class_index() -> None:
    scores = np.zeros((3, 4))
    labels = np.array([0, 1, 3])
    assert true_class_rank(scores, labels).tolist() == [0, 1, 3]
    assert topk_errors(scores, labels, ks=(1, 2, 3, 4)) == {1: 2 / 3, 2: 1 / 3, 3: 1 / 3, 4: 0.0}


def test_rank_equals_position_in_a_stable_sort() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 10)).astype(np.float32)  # many ties
    labels = rng.integers(0, 10, size=200)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = np.argmax(order == labels[:, None], axis=1)
    np.testing.assert_array_equal(true_class_rank(scores, labels), expected)


def test_nan_rows_count_as_errors() -> None:
    scores = np.array([[np.nan, 0.0], [1.0, 0.0]])
    assert topk_errors(scores, np.array([0, 0]), ks=(1,)) == {1: 0.5}


def test_topk_errors_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got min 0 max 3"):
        topk_errors(SCORES, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        topk_errors(SCORES, np.array([0, 1]))
    with pytest.raises(ValueError, match="ks must be positive integers"):
        topk_errors(SCORES, LABELS, ks=(0,))


def test_jsonl_writer_converts_numpy_and_flushes_every_line(tmp_path) -> None:
    path = tmp_path / "logs" / "train.jsonl"
    with JsonlWriter(path) as log:
        log.write({"step": np.int64(3), "loss": np.float32(0.5), "lr": 0.01,
                   "top": np.array([1, 2]), "bad": float("nan")})
        # flushed before close: another reader sees the complete line now
        assert json.loads(path.read_text()) == {"step": 3, "loss": 0.5, "lr": 0.01,
                                                "top": [1, 2], "bad": None}
        log.write({"step": 4})
    assert [r["step"] for r in read_jsonl(path)] == [3, 4]
    with pytest.raises(ValueError, match="closed"):
        log.write({"step": 5})


def test_jsonl_writer_after_a_crash_mid_line_keeps_later_records(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # the crash cut line 2
    with JsonlWriter(path) as log:
        log.write({"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]
    with pytest.raises(ValueError, match=r"train.jsonl:2: not a JSON line"):
        read_jsonl(path, strict=True)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timer_and_stopwatch_accumulate_named_spans() -> None:
    clock = FakeClock()
    timer = Timer(clock)
    watch = Stopwatch(clock)
    with watch.span("forward"):
        clock.now += 2.0
    with pytest.raises(RuntimeError), watch.span("forward"):
        clock.now += 1.0
        raise RuntimeError("timed even when it raises")
    watch.add("comm", 0.5)
    assert watch.totals == {"forward": 3.0, "comm": 0.5}
    assert watch.counts == {"forward": 2, "comm": 1}
    assert watch.mean("forward") == 1.5 and watch.mean("never") == 0.0
    assert timer.elapsed() == 3.0 and timer.restart() == 3.0 and timer.elapsed() == 0.0
    assert watch.snapshot(reset=True) == {"forward": 3.0, "comm": 0.5}
    assert watch.totals == {} and watch.counts == {}
