"""A tiny synthetic task and a stub EvalModel on ``tiny_llava`` (shared by the eval/viz tests).

Importable as ``_tiny`` when ``tests/eval`` is on ``sys.path`` (the tests add it), so the
command line and launched worker processes can name ``_tiny:tiny_task`` / ``_tiny:tiny_model``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tokenprune.eval.models import ProcessorEvalModel
from tokenprune.eval.tasks import Sample, Task, limit_per_family
from tokenprune.testing.models import BOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava

SIZE, PATCH = 32, 8
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class TinyTask(Task):
    """Solid-colour images; yes/no questions in two families, 3 samples each by default."""

    name = "tiny"
    families = ("colour", "bright")
    default_limit = 3

    def samples(self, split: str, seed: int, limit: int | None) -> list[Sample]:
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        names = list(COLOURS)
        out = []
        for family in self.families:
            for i in range(8):
                colour = names[int(rng.integers(len(names)))]
                image = np.empty((SIZE, SIZE, 3), np.uint8)
                image[:] = COLOURS[colour]
                image[: SIZE // 2, : SIZE // 2] = rng.integers(0, 255, (SIZE // 2, SIZE // 2, 3))
                if family == "colour":
                    asked = names[i % len(names)]
                    question, answer = f"Is the image {asked}?", "yes" if asked == colour else "no"
                else:
                    question, answer = "Is it bright?", "yes" if i % 2 else "no"
                out.append(
                    Sample(f"{split}-{family}-{i}", len(out), family, image, question, answer)
                )
        return limit_per_family(out, limit if limit is not None else self.default_limit)


def tiny_task() -> TinyTask:
    return TinyTask()


def encode(images: list[np.ndarray], questions: list[str]) -> Mapping[str, Any]:
    n = (SIZE // PATCH) ** 2
    rows = []
    for q in questions:
        words = [10 + zlib.crc32(w.encode()) % 800 for w in q.split()]
        rows.append([BOS_TOKEN_ID, *[IMAGE_TOKEN_ID] * n, *words])
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    pixels = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def decode(tokens: torch.Tensor) -> list[str]:
    return ["yes" if int(row[0]) % 2 == 0 else "no" for row in tokens]


class CountingModel(ProcessorEvalModel):
    """The stub model, counting ``generate`` calls and recording their keyword arguments."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, encode, decode, name="tiny_llava")
        self.calls: list[dict[str, Any]] = []

    def generate(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str],
        *,
        max_new_tokens: int,
        **generate_kwargs: Any,
    ) -> list[str]:
        self.calls.append({"questions": list(questions), **generate_kwargs})
        return super().generate(images, questions, max_new_tokens=max_new_tokens, **generate_kwargs)


def tiny_model(device: str | torch.device = "cpu") -> CountingModel:
    model = tiny_llava(image_size=SIZE, patch_size=PATCH).to(device)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return CountingModel(model)
