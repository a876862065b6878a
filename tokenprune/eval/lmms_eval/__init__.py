r"""lmms-eval integration: evaluate any supported VLM with a pruning pipeline under ``lmms_eval``.

``pip install 'tokenprune[lmms]'`` registers the model ``tokenprune`` with lmms-eval through
the entry-point group ``lmms_eval.models`` (no patching of lmms-eval)::

    lmms-eval --model tokenprune \
        --model_args pretrained=shipped,pipeline=configs/cls_attention_topk64.yaml \
        --tasks tokenprune_shapes --include_path "$(python -m tokenprune.eval.lmms_eval)"

Pieces:

* :func:`model_manifest`: the entry point; names the class by path, so lmms-eval imports it
  (and torch) only when ``--model tokenprune`` is asked for;
* :mod:`~tokenprune.eval.lmms_eval.model`: the model class (subclasses lmms-eval's
  ``lmms``, so it imports lmms-eval);
* :mod:`~tokenprune.eval.lmms_eval.shapes` and :data:`TASKS_DIR`: the offline
  ``tokenprune_shapes`` task (the shipped toy model's questions, scored like ``tokenprune eval``).

This module imports lmms-eval only inside :func:`model_manifest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "MODEL_CLASS", "MODEL_NAME", "TASKS_DIR", "model_manifest"]

MODEL_NAME = "tokenprune"
"""The ``--model`` name."""
MODEL_CLASS = "tokenprune.eval.lmms_eval.model.TokenPruneLMM"
"""Import path of the model class, as lmms-eval's manifest wants it."""
TASKS_DIR = Path(__file__).parent / "tasks"
"""Directory of the shipped task definitions: pass it to ``lmms-eval --include_path``."""
INSTALL_HINT = "pip install 'tokenprune[lmms]'"


def model_manifest() -> Any:
    """Return lmms-eval's ``ModelManifest`` for ``--model tokenprune`` (the entry point).

    lmms-eval calls this while it builds its model registry; the manifest names the model class
    by import path, so nothing heavy is imported here.

    Raises:
        ImportError: If lmms-eval is not installed (the message gives :data:`INSTALL_HINT`).
    """
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as exc:  # pragma: no cover - only reachable without the extra
        raise ImportError(f"the lmms-eval integration needs lmms-eval: {INSTALL_HINT}") from exc
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)
