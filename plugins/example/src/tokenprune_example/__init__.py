"""An example tokenprune plugin: the ``feature_norm`` scorer.

Installing the distribution ``tokenprune-example`` makes the scorer available to every
tokenprune runtime through the entry point ``example`` (group ``tokenprune``)::

    import tokenprune

    cfg = {"scorer": {"name": "feature_norm"}, "selector": {"name": "topk"}, "keep": 64}
    with tokenprune.apply(model, cfg):
        out = model.generate(**inputs, max_new_tokens=16)

The package is three small files: :mod:`tokenprune_example.norm` (the functional twin and the
stage), :mod:`tokenprune_example.plugin` (the hook that registers the stage) and this one.
"""

from __future__ import annotations

from tokenprune_example.norm import FeatureNormScorer, FeatureNormScorerConfig, feature_norm_scores

__all__ = ["FeatureNormScorer", "FeatureNormScorerConfig", "feature_norm_scores"]
