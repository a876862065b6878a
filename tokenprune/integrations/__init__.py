"""Bridges to other tools; each one needs its own optional extra and is imported only on use.

* :mod:`tokenprune.integrations.lmms_eval`: ``lmms_eval --model tokenprune`` (extra ``lmms``).

Importing :mod:`tokenprune` never imports an integration, and an integration's top module
never imports the tool it bridges to, so listing or documenting them works without it.
"""

from __future__ import annotations
