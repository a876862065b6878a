"""DeSAP for tokenprune: decoupled-similarity task relevance plus [CLS] saliency.

Implements "Decoupled Similarity for Task-Aware Token Pruning in Large Vision-Language Models"
(Ma et al., arXiv 2604.11240). The pure-tensor core lives in
:mod:`tokenprune_desap.functional`; it needs only torch and can be used without tokenprune.
"""

from __future__ import annotations

__all__: list[str] = []
