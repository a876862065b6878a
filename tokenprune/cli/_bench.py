"""``tokenprune bench``: measured latency and memory of a VLM, unpruned vs pruned, interleaved.

Registered by :mod:`tokenprune.cli` through :func:`register`; the measurement lives in
:mod:`tokenprune.bench.latency` and the models in :mod:`tokenprune.bench.presets`. torch and
transformers are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, cast

from tokenprune.bench.flops import CONVENTIONS
from tokenprune.bench.presets import PRESETS, list_presets
from tokenprune.cli._common import runtime_from_args
from tokenprune.errors import ConfigError, TokenPruneError

if TYPE_CHECKING:
    from tokenprune.bench.flops import Convention
    from tokenprune.config import PipelineConfig
    from tokenprune.plugin import Runtime

__all__ = ["DEFAULT_PIPELINE", "handler", "register"]

DEFAULT_PIPELINE: dict[str, Any] = {
    "scorer": {"name": "cls_attention", "layer": -2},
    "selector": {"name": "topk"},
    "merger": {"name": "drop"},
}
"""The pipeline measured without ``--pipeline``: FasterVLM-style [CLS]-attention top-K."""

_DEFAULT_KEEP = 64

_EPILOG = """\
Runs model.generate() unpruned and pruned on the same model instance, interleaved (unpruned,
pruned, unpruned, pruned, ...), after --warmup untimed repeats of each, and reports medians:
vision encoder, pruning stage (scorer + selector + merger), LLM prefill, time per decoded token,
the whole generate call, the KV cache after prefill and, on CUDA, the peak allocated memory.
The prefill speedup is printed next to the FLOPs-predicted ratio for the same shapes
(`tokenprune flops`, whole-prefill scope, the prompt's real text-token count).

examples:
  tokenprune bench --preset tiny --keep 16 --repeats 3
  tokenprune bench --preset real-shaped --keep 64 --dtype bfloat16
  tokenprune bench --preset real-shaped --lm-layers 4 --keep-ratio 0.111 --json
  tokenprune bench --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --device cuda
"""


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand.

    Args:
        subparsers: The ``add_subparsers()`` object of the ``tokenprune`` parser. The new parser
            sets ``func=handler``.
    """
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill/decode latency and memory, unpruned vs pruned (interleaved)",
        description=(
            "Measured latency and memory of a VLM before and after visual-token pruning, in "
            "one run, interleaved, with the FLOPs-predicted prefill ratio next to the measured "
            "one. For the analytic count alone see `tokenprune flops`."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset",
        choices=list_presets(),
        help="random-weight model built from configs: "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    source.add_argument(
        "--model",
        metavar="PATH",
        help="a local checkpoint directory or a hub id, loaded with "
        "transformers.AutoModelForImageTextToText (LLaVA-1.5-style models)",
    )
    parser.add_argument(
        "--lm-layers",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="presets only: build the language model with N layers (quicker runs)",
    )
    parser.add_argument(
        "--pipeline",
        metavar="FILE",
        default=None,
        help="pipeline config (YAML/TOML/JSON); default: cls_attention (layer -2) + topk + drop",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--keep",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help=f"visual tokens kept per image (default: the file's budget, else {_DEFAULT_KEEP})",
    )
    budget.add_argument(
        "--keep-ratio",
        type=_ratio,
        default=None,
        metavar="R",
        help="fraction of the visual tokens kept per image, in (0, 1]",
    )
    parser.add_argument(
        "--text-tokens",
        type=_int_at_least(1),
        default=40,
        metavar="T",
        help="non-image tokens per prompt, BOS included (default: 40)",
    )
    parser.add_argument(
        "--batch-size", type=_int_at_least(1), default=1, metavar="B", help="prompts (default 1)"
    )
    parser.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=5,
        metavar="R",
        help="timed repeats per variant; medians are reported (default: 5)",
    )
    parser.add_argument(
        "--warmup",
        type=_int_at_least(0),
        default=1,
        metavar="W",
        help="untimed warm-up repeats per variant (default: 1)",
    )
    parser.add_argument(
        "--new-tokens",
        type=_int_at_least(1),
        default=8,
        metavar="N",
        help="tokens generated per call; decode time is measured over the N-1 steps after the "
        "prefill (default: 8)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype (default: float32; bfloat16 is faster on CPUs with AMX)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto (cuda when available; default)",
    )
    parser.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="torch intra-op threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--convention",
        choices=list(CONVENTIONS),
        default="desap",
        help="FLOPs formula of the prediction: desap counts the 3 SwiGLU FFN matrices of a "
        "Llama LM, fastv 2 (default: desap)",
    )
    parser.add_argument(
        "--seed", type=_int_at_least(0), default=0, help="seed of weights and inputs"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=handler)


def _pipeline_config(args: argparse.Namespace, runtime: Runtime) -> PipelineConfig:
    """The pipeline config from ``--pipeline`` (or the default) with the budget options applied."""
    if args.pipeline is not None:
        data = runtime.load_config(args.pipeline).to_dict()
    else:
        data = {**DEFAULT_PIPELINE, "keep": _DEFAULT_KEEP}
    if args.keep is not None or args.keep_ratio is not None:
        data.pop("keep", None)
        data.pop("keep_ratio", None)
        data["keep" if args.keep is not None else "keep_ratio"] = (
            args.keep if args.keep is not None else args.keep_ratio
        )
    return runtime.parse_config(data)


def _device(text: str) -> Any:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(f"invalid --device {text!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {text}: only cpu and cuda are supported")
    return device


def _log(message: str) -> None:
    print(f"tokenprune bench: {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> str:
    import torch

    from tokenprune.bench.latency import (
        cpu_bf16_native,
        format_result,
        make_inputs,
        run_benchmark,
    )
    from tokenprune.bench.presets import (
        build_preset,
        load_pretrained,
        preset_visual_tokens,
        resolve_dtype,
    )
    from tokenprune.functional import resolve_budget

    if args.model is not None and args.lm_layers is not None:
        raise ConfigError("--lm-layers applies to --preset models only")
    device = _device(args.device)
    dtype = resolve_dtype(args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_bf16_native() is False:
        _log(
            "warning: this CPU has no native bfloat16 (no AVX512-BF16/AMX; capability "
            f"{torch.backends.cpu.get_cpu_capability()}); bfloat16 matmuls are emulated and can "
            "be 100x slower than float32, so the timings measure the emulation"
        )
    runtime = runtime_from_args(args)
    config = _pipeline_config(args, runtime)
    if args.preset is not None:  # check the budget before a minute of random initialisation
        resolve_budget(
            preset_visual_tokens(args.preset), keep=config.keep, keep_ratio=config.keep_ratio
        )
    start = time.perf_counter()
    if args.preset is not None:
        model = build_preset(
            args.preset, dtype=dtype, device=device, lm_layers=args.lm_layers, seed=args.seed
        )
        name = args.preset + (f" (LM cut to {args.lm_layers} layers)" if args.lm_layers else "")
        description = PRESETS[args.preset].description
    else:
        model = load_pretrained(args.model, dtype=dtype, device=device)
        name, description = args.model, ""
    _log(f"model ready in {time.perf_counter() - start:.1f} s; measuring")
    inputs = make_inputs(
        model, text_tokens=args.text_tokens, batch_size=args.batch_size, seed=args.seed
    )
    result = run_benchmark(
        model,
        config,
        inputs,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        convention=cast("Convention", args.convention),
        runtime=runtime,
        name=name,
        description=description,
    )
    if args.json:
        return json.dumps(result.to_dict(), indent=2)
    return format_result(result)


def handler(args: argparse.Namespace) -> int:
    """Run ``tokenprune bench``: print a Markdown report (or JSON with ``--json``).

    Args:
        args: Parsed arguments of the ``bench`` parser.

    Returns:
        0 on success, 2 on invalid input (the message goes to stderr).
    """
    try:
        output = _run(args)
    except TokenPruneError as exc:
        print(f"tokenprune bench: error: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0
