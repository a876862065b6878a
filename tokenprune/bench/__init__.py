"""Efficiency measurement for pruned VLMs.

:mod:`tokenprune.bench.flops` computes analytic prefill FLOPs and KV-cache sizes from model shapes
alone (pure Python, no torch). Nothing is imported here, so ``import tokenprune.bench`` stays
cheap; import the submodules you need.
"""
