"""Sharding and merging: N processes write exactly what one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenprune.eval.parallel import (
    RESULTS_FILE,
    ProcessInfo,
    assign_batches,
    merge_results,
    read_records,
    shard_path,
)
from tokenprune.eval.runner import (
    EvalSpec,
    PipelineSpec,
    finalize,
    parse_budgets,
    run_eval,
    run_shard,
)

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
RANDOM = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 4}


def _record(pipeline: str, budget: str, sample: str, index: int, **extra: Any) -> dict[str, Any]:
    return {"pipeline": pipeline, "budget": budget, "sample_id": sample, "index": index, **extra}


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_assign_batches_partitions_in_order(count: int) -> None:
    items = list(range(11))
    shares = [assign_batches(items, 3, i, count) for i in range(count)]
    flat = sorted(x for share in shares for batch in share for x in batch)
    assert flat == items
    # Batches are the single-process batches, dealt round-robin.
    single = assign_batches(items, 3, 0, 1)
    for i, share in enumerate(shares):
        assert share == single[i::count]
    with pytest.raises(ValueError, match="outside"):
        assign_batches(items, 3, count, count)


def test_merge_is_deterministic_and_sorted(tmp_path: Path) -> None:
    recs = [_record("p", b, f"s{i}", i, v=i) for b in ("0.5", "4") for i in (2, 0, 10, 1)]
    outs = []
    for order, world in ((recs, 2), (recs[::-1], 3)):
        out = tmp_path / f"w{world}"
        for i, rec in enumerate(order):
            path = shard_path(out, i % world, world)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
        merged = merge_results(out)
        assert [(r["budget"], r["index"]) for r in merged] == [
            (b, i) for b in ("0.5", "4") for i in (0, 1, 2, 10)
        ]
        assert not (out / "shards").exists()
        outs.append((out / RESULTS_FILE).read_text())
    assert outs[0] == outs[1]


def test_merge_keeps_first_record_per_key(tmp_path: Path) -> None:
    (tmp_path / RESULTS_FILE).write_text(json.dumps(_record("p", "1", "a", 0, v="old")) + "\n")
    path = shard_path(tmp_path, 0, 1)
    path.parent.mkdir()
    path.write_text(
        json.dumps(_record("p", "1", "a", 0, v="new")) + "\n"
        + json.dumps(_record("p", "1", "b", 1, v="b")) + "\n{not json"
    )  # fmt: skip
    assert len(read_records(tmp_path)) == 2
    merged = merge_results(tmp_path)
    assert [r["v"] for r in merged] == ["old", "b"]


def _spec(tiny: Any) -> EvalSpec:
    return EvalSpec(
        task=tiny.tiny_task(),
        pipelines=[PipelineSpec("random", RANDOM)],
        budgets=parse_budgets("0.5"),
        batch_size=2,
        max_new_tokens=2,
    )


def test_two_shards_equal_one_process(tiny: Any, tmp_path: Path) -> None:
    model = tiny.tiny_model()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_eval(model, _spec(tiny), single, progress=False)
    # What the barrier guarantees in a real run: both processes see the same finished keys.
    finished = set(read_records(sharded))
    written = [
        run_shard(
            model, _spec(tiny), sharded, process=ProcessInfo(i, 2), progress=False,
            finished=finished,
        )
        for i in (1, 0)
    ]  # fmt: skip
    assert written == [4, 8]  # 2 jobs x 3 batches of 2: rank 0 gets batches 0 and 2 of each
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == [
        "rank-00000-of-00002.jsonl",
        "rank-00001-of-00002.jsonl",
    ]
    finalize(_spec(tiny), sharded)
    for name in (RESULTS_FILE, "summary.md", "summary.csv"):
        assert (sharded / name).read_text() == (single / name).read_text(), name


@pytest.mark.slow
def test_two_real_processes_equal_one_process(tiny: Any, tmp_path: Path) -> None:
    """``tokenprune eval --num-processes 2`` through ``accelerate launch`` on 2 CPU processes."""
    cfg = tmp_path / "random.yaml"
    cfg.write_text("scorer: {name: random}\nselector: {name: topk}\nkeep: 4\n")
    args = [
        "eval", "--model", "_tiny:tiny_model", "--task", "_tiny:tiny_task", "--pipeline",
        str(cfg), "--budgets", "0.5,4", "--batch-size", "2", "--max-new-tokens", "2",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune", *args, "--out", str(tmp_path / "multi"),
         "--num-processes", "2"],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from tokenprune.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for name in (RESULTS_FILE, "summary.md", "summary.csv"):
        assert (tmp_path / "multi" / name).read_text() == (tmp_path / "one" / name).read_text()
    runs = [json.loads(x) for x in (tmp_path / "multi" / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["num_processes"] == 2
