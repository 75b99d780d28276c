"""kdc_kernels: fast, tested PyTorch ops for partially relevant video retrieval.

Public ops (each takes ``impl=None|"auto"|"reference"|"triton"|"cuda"``; ``KDC_IMPL`` sets the
default):

* :func:`windowed_attention` - dynamic temporal windowed attention with a relative position bias.
* :func:`max_similarity` - batched clip-level max-similarity scoring (+ argmax clip).
* :func:`max_similarity_topk` - corpus-scale top-k retrieval by the same score.
* :func:`merge_topk` - the same ranking rule for a top-k list streamed over blocks of scores.

Layers live in :mod:`kdc_kernels.nn`; ``python -m kdc_kernels.info`` reports what can run here.
"""

from .ops.max_similarity import max_similarity, max_similarity_topk, merge_topk
from .ops.windowed_attention import windowed_attention

__version__ = "0.1.0"

__all__ = ["windowed_attention", "max_similarity", "max_similarity_topk", "merge_topk", "__version__"]
