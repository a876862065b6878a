"""Data-parallel evaluation: deterministic sharding, per-process shard files and the merge.

Every process (``accelerate launch -m tokenprune eval ...`` or ``tokenprune eval
--num-processes N``) builds the same work list; for each (pipeline, budget) the pending samples
are cut into batches in canonical order and batch ``j`` goes to process ``j % N``
(:func:`assign_batches`). A batch therefore holds exactly the samples it would hold in a single
process, so the answers do not depend on the number of processes. Each process appends its
results to ``OUT/shards/rank-RRRRR-of-NNNNN.jsonl``; after a barrier the main process merges the
existing ``results.jsonl`` and every shard, keeps the first record of each key and writes them
sorted by key (:func:`merge_results`). A single process runs the same code with ``N = 1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "RESULTS_FILE",
    "SHARD_DIR",
    "ProcessInfo",
    "assign_batches",
    "current_process",
    "has_records",
    "launch",
    "launched",
    "merge_results",
    "read_records",
    "record_key",
    "shard_path",
    "sort_key",
]

T = TypeVar("T")
RESULTS_FILE = "results.jsonl"
SHARD_DIR = "shards"
Key = tuple[str, str, str]


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in a data-parallel run.

    Attributes:
        index: Rank, ``0 <= index < count``.
        count: Number of processes.
        barrier: Blocks until every process has called it.
        device: Suggested device for this process's model.
    """

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Whether this is the process that merges and reports (rank 0)."""
        return self.index == 0


def launched() -> bool:
    """Whether this process was started by ``accelerate launch``/``torchrun`` with >1 process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_process(*, cpu: bool | None = None) -> ProcessInfo:
    """Describe this process: a real distributed group under a launcher, else a single process.

    Under a launcher the process group is initialised through ``accelerate.PartialState`` (gloo
    on CPU, NCCL on GPUs) and ``barrier`` is its ``wait_for_everyone``.

    Args:
        cpu: Use CPU processes (gloo) even if GPUs are visible; default: only without CUDA.
    """
    import torch

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if not launched():
        return ProcessInfo(device="cpu" if cpu else "cuda")
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return ProcessInfo(
        index=state.process_index,
        count=state.num_processes,
        barrier=state.wait_for_everyone,
        device=str(state.device),
    )


def assign_batches(items: Sequence[T], batch_size: int, index: int, count: int) -> list[list[T]]:
    """Cut ``items`` into batches in order and return the batches of process ``index``.

    Examples:
        >>> assign_batches(list(range(7)), 2, 0, 2)
        [[0, 1], [4, 5]]
        >>> assign_batches(list(range(7)), 2, 1, 2)
        [[2, 3], [6]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is outside [0, {count})")
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return batches[index::count]


def shard_path(out_dir: Path, index: int, count: int) -> Path:
    """The shard file of process ``index`` of ``count``."""
    return out_dir / SHARD_DIR / f"rank-{index:05d}-of-{count:05d}.jsonl"


def record_key(record: Mapping[str, Any]) -> Key:
    """The results key ``(pipeline, budget, sample_id)`` of a record."""
    return (str(record["pipeline"]), str(record["budget"]), str(record["sample_id"]))


def sort_key(record: Mapping[str, Any]) -> tuple[str, str, int, str]:
    """Sort order of ``results.jsonl``: pipeline, budget, sample index, sample id."""
    return (
        str(record["pipeline"]),
        str(record["budget"]),
        int(record.get("index", 0)),
        str(record["sample_id"]),
    )


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            if isinstance(record, dict) and {"pipeline", "budget", "sample_id"} <= set(record):
                yield record


def _sources(out_dir: Path) -> list[Path]:
    shards = sorted((out_dir / SHARD_DIR).glob("*.jsonl")) if (out_dir / SHARD_DIR).is_dir() else []
    return [out_dir / RESULTS_FILE, *shards]


def read_records(out_dir: Path) -> dict[Key, dict[str, Any]]:
    """Every finished record of ``out_dir`` (``results.jsonl`` then the shards), first per key.

    Unparsable lines (a write cut short by an interruption) are ignored.
    """
    records: dict[Key, dict[str, Any]] = {}
    for path in _sources(out_dir):
        for record in _read_jsonl(path):
            records.setdefault(record_key(record), record)
    return records


def has_records(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds any finished record; reads no further than the first one."""
    return any(True for path in _sources(out_dir) for _ in _read_jsonl(path))


def dump_record(record: Mapping[str, Any]) -> str:
    """One JSON line (no trailing newline), keys in insertion order."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def merge_results(out_dir: Path) -> list[dict[str, Any]]:
    """Fold the shard files into ``results.jsonl`` (sorted by key) and delete the shards.

    Deterministic: the output depends only on the set of records, not on which process wrote
    which. The file is replaced atomically.

    Returns:
        The merged records, in file order.
    """
    records = sorted(read_records(out_dir).values(), key=sort_key)
    target = out_dir / RESULTS_FILE
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("".join(dump_record(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(target)
    shard_dir = out_dir / SHARD_DIR
    if shard_dir.is_dir():
        for path in shard_dir.glob("*.jsonl"):
            path.unlink()
        if not any(shard_dir.iterdir()):
            shard_dir.rmdir()
    return records


def launch(argv: Iterable[str], num_processes: int) -> int:
    """Run ``python -m tokenprune ARGV`` in ``num_processes`` processes with ``accelerate launch``.

    Uses accelerate's torchrun-based launcher (``--multi_gpu``), which starts the processes on
    CPU-only machines too; each worker then picks CPU (gloo) or its GPU in
    :func:`current_process`. (``accelerate launch --cpu`` would start a single process.)

    Args:
        argv: Command-line arguments of ``tokenprune`` (global options, then the subcommand).
        num_processes: Number of processes (at least 2).

    Returns:
        The launcher's exit status.
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tokenprune",
        *argv,
    ]
    return subprocess.call(command)
