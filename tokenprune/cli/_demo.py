"""``tokenprune demo``: run every installed method on one model and print a table."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from tokenprune.cli._common import format_table, runtime_from_args

if TYPE_CHECKING:
    import torch

__all__ = ["register"]

_METHODS: dict[str, dict[str, Any]] = {
    "random": {"scorer": {"name": "random"}, "selector": {"name": "topk"}},
    "cls_attention": {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}},
}


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    parser = sub.add_parser(
        "demo",
        help="evaluate every installed method on the shipped default model (or, until it is "
        "trained, time them on a random-weight LLaVA-shaped model) and print a table",
    )
    parser.add_argument("--keep-ratio", type=float, default=0.111, help="fraction kept (0.111)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method")
    parser.add_argument("--out", default="runs/demo", help="output directory (runs/demo)")
    parser.set_defaults(func=run)


def shipped_model_ready() -> bool:
    """Whether the trained default model's files are in the package."""
    from tokenprune.toy.model import ASSETS, TRAINED_FILE

    needed = ("vlm/config.json", f"vlm/{TRAINED_FILE}", "clip/model.safetensors", "processor")
    return all((ASSETS / rel).exists() for rel in needed)


def run(args: argparse.Namespace) -> int:
    """Evaluate on the shipped model when it is there; otherwise run the timing demo."""
    if shipped_model_ready():
        from tokenprune.eval.demo import run_demo
        from tokenprune.toy import lm

        lm.fetch()  # no-op when the verified file is already cached
        run_demo(args.out, plugins=getattr(args, "plugin", []))
        print(f"\nresults, plot and overlay written to {args.out}/")
        return 0
    print(
        "The shipped default model is not trained yet (tokenprune/toy/assets holds no VLM "
        "weights; `tokenprune toy train` produces them), so this demo times the installed "
        "methods on a random-weight model instead: accuracy needs trained weights.\n"
    )
    return run_timing(args)


def _timed_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int
) -> tuple[float, int]:
    import torch

    times = []
    length = 0
    with torch.inference_mode():
        model(**batch)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**batch)
            times.append(time.perf_counter() - start)
            length = int(out.logits.shape[1])
    return sorted(times)[len(times) // 2], length


def run_timing(args: argparse.Namespace) -> int:
    """Prune a random-weight LLaVA with LLaVA-1.5's token layout (576 tokens per image)."""
    import torch

    from tokenprune.api import apply
    from tokenprune.testing import llava_prompts, tiny_llava

    runtime = runtime_from_args(args)
    torch.manual_seed(0)
    model = tiny_llava(image_size=336, patch_size=14, hidden=256, layers=4)
    batch = llava_prompts(model, [(8, 24), (8, 24)])
    print(
        "Random-weight LLaVA with LLaVA-1.5's token layout (CLIP 336/14: 576 visual tokens per "
        f"image), batch 2, keep ratio {args.keep_ratio}. Times are medians of {args.repeats} "
        "forward passes on this machine."
    )
    base_time, base_len = _timed_forward(model, batch, args.repeats)
    rows: list[list[object]] = [["unpruned", 576, base_len, f"{base_time * 1e3:.0f}", "1.00x"]]
    methods = {
        name: cfg
        for name, cfg in _METHODS.items()
        if cfg["scorer"]["name"] in runtime.stages.names("scorer")
    }
    for name, cfg in methods.items():
        config = {**cfg, "keep_ratio": args.keep_ratio}
        with apply(model, config, runtime=runtime) as handle:
            t, length = _timed_forward(model, batch, args.repeats)
            kept = handle.pipeline.budget(576)
        rows.append([name, kept, length, f"{t * 1e3:.0f}", f"{base_time / t:.2f}x"])
    print(format_table(["method", "visual tokens", "LLM sequence", "forward ms", "speed-up"], rows))
    return 0
