"""One folder per op: ``api.py`` (validation, impl choice, the public function and the op's
:class:`~kdc_kernels._backend.OpSpec`), ``reference.py`` (the oracle), ``_triton.py`` /
``_cuda.py`` (fast paths).

``OPS`` is the op table: dispatch, ``kdc_kernels.info`` and the compiled extension's op list read
it. A new op is registered by adding its spec here (README, "Adding an op").
"""

from .max_similarity.api import MAX_SIMILARITY, MAX_SIMILARITY_TOPK
from .windowed_attention.api import WINDOWED_ATTENTION

OPS = (WINDOWED_ATTENTION, MAX_SIMILARITY, MAX_SIMILARITY_TOPK)
