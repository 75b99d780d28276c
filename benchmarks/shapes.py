"""One set of benchmark shapes per op, shared by every benchmark harness: the pytest-benchmark suite
(``test_bench_ops.py``) and the competitor scripts (``bench_windowed_attention.py``,
``bench_max_similarity.py``, ``bench_cuda_kernels.py``).

The shapes are those of the op contract's speed targets (benchmarks/targets.py checks them):

=====================  =====================================================  =====  =============
op                     shape                                                  quick  CPU smoke size
=====================  =====================================================  =====  =============
windowed_attention     prvr-L32 / L64 / L128: B=256 H=8 D=64 R=32, sigma in   L32,   B=2 H=2 D=16 R=4,
                       [0.5, L/2 + 1] (PRVR training)                         L128   L=8 / 32
windowed_attention     long-L2048 .. L16384: B=2 H=8 D=64 R=32, sigma in      2048,  B=1 H=2 D=16 R=4,
                       [1, 64], cutoff=3 (long videos; 2x L per step)         4096   L=64 / 128, sigma <= 4
max_similarity         train: Nq=640 Nv=128 L=128 D=384, fwd+bwd              yes    24 x 10 x 8 x 32
max_similarity         tvr-scores: Nq=10,895 Nv=2,179 L=128 D=384 (TVR test)  yes    24 x 20 x 8 x 32
max_similarity_topk    tvr-topk: the TVR test set, k=100                      yes    24 x 20 x 8 x 32, k=5
max_similarity_topk    corpus-topk: Nq=10,000 Nv=100,000 L=32 D=512, k=100   no     12 x 300 x 2 x 16, k=130
=====================  =====================================================  =====  =============

Tiers (:func:`attention_shapes`, :func:`similarity_shapes`): ``full`` (every shape: a GPU run),
``quick`` (the ``--quick`` subset) and ``smoke`` (the quick subset scaled down to CPU sizes: the same
names, so every harness reports the same rows on a CPU, in seconds, with the Triton kernels on the
interpreter). Attention inputs have no padding (``lengths=None``); max-sim inputs ragged lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kdc_kernels import testing

TIERS = ("full", "quick", "smoke")
# Competitors whose O(L^2) memory makes them impractical past this many logits per call.
DENSE_LIMIT = 2**29
GRAD_NAMES = ("q", "k", "v", "rel_bias", "sigma")


@dataclass(frozen=True)
class AttentionShape:
    """A ``windowed_attention`` benchmark shape. ``sigma_max``: None for the test inputs' range
    [0.5, L/2 + 1], else sigma uniform in [1, sigma_max]; ``smoke``: the CPU sizes of this shape
    (None: not in the smoke tier)."""

    suite: str
    B: int
    H: int
    L: int
    D: int
    R: int
    sigma_max: float | None = None
    cutoff: float | None = None
    name: str = ""
    quick: bool = False
    smoke: dict | None = None

    @property
    def label(self) -> str:
        cut = f" cutoff={self.cutoff:g}" if self.cutoff else ""
        return f"B={self.B} H={self.H} L={self.L} D={self.D}{cut}"

    @property
    def logits(self) -> int:
        """Elements of a dense ``[B, H, L, L]`` logit tensor (see :data:`DENSE_LIMIT`)."""
        return self.B * self.H * self.L * self.L

    def inputs(self, dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = True) -> dict:
        """q, k, v, rel_bias, sigma (lengths None) as keyword arguments of the op."""
        args = testing.attention_inputs(self.B, self.H, self.L, self.D, R=self.R, lengths=None, dtype=dtype,
                                        device=device, seed=seed)
        if self.sigma_max is not None:
            g = testing.make_generator(seed + 1000)
            args["sigma"] = (1.0 + (self.sigma_max - 1.0) * torch.rand(self.B, self.H, self.L, generator=g)).to(device)
        if requires_grad:
            for n in GRAD_NAMES:
                args[n].requires_grad_(True)
        return args


@dataclass(frozen=True)
class SimilarityShape:
    """A ``max_similarity`` (``k`` None) or ``max_similarity_topk`` benchmark shape: queries
    ``[nq, D]``, clips ``[nv, L, D]``; ``backward``: timed forward + backward."""

    name: str
    nq: int
    nv: int
    L: int
    D: int
    k: int | None = None
    backward: bool = False
    quick: bool = False
    smoke: dict | None = None

    @property
    def label(self) -> str:
        k = f" k={self.k}" if self.k else ""
        return f"{self.name}: Nq={self.nq} Nv={self.nv} L={self.L} D={self.D}{k}"

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def tflop(self) -> float:
        """Dense-equivalent work in TFLOP: the [Nq, Nv*L] GEMM (x3 with its two gradient GEMMs)."""
        return (3 if self.backward else 1) * 2 * self.nq * self.nv * self.L * self.D / 1e12

    def inputs(self, dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = False) -> dict:
        """queries, clips, ragged lengths as keyword arguments of the op (drawn on the device: the
        corpus shape's clips are 6.5 GB in fp32)."""
        g = torch.Generator(device=device).manual_seed(seed)
        queries = torch.randn(self.nq, self.D, device=device, generator=g).to(dtype)
        clips = torch.randn(self.nv, self.L, self.D, device=device, generator=g).to(dtype)
        if requires_grad:
            queries.requires_grad_(True)
            clips.requires_grad_(True)
        return dict(queries=queries, clips=clips, lengths=testing.ragged_lengths(self.nv, self.L, seed, device))


def _prvr(L: int, quick: bool = False, smoke_L: int | None = None) -> AttentionShape:
    smoke = dict(B=2, H=2, L=smoke_L, D=16, R=4) if smoke_L else None
    return AttentionShape("prvr", 256, 8, L, 64, 32, name=f"prvr-L{L}", quick=quick, smoke=smoke)


def _long(L: int, quick: bool = False, smoke_L: int | None = None) -> AttentionShape:
    smoke = dict(B=1, H=2, L=smoke_L, D=16, R=4, sigma_max=4.0) if smoke_L else None
    return AttentionShape("long", 2, 8, L, 64, 32, 64.0, 3.0, name=f"long-L{L}", quick=quick, smoke=smoke)


ATTENTION = [
    _prvr(32, quick=True, smoke_L=8), _prvr(64), _prvr(128, quick=True, smoke_L=32),
    _long(2048, quick=True, smoke_L=64), _long(4096, quick=True, smoke_L=128), _long(8192), _long(16384),
]
SIMILARITY = [
    SimilarityShape("train", 640, 128, 128, 384, backward=True, quick=True, smoke=dict(nq=24, nv=10, L=8, D=32)),
    SimilarityShape("tvr-scores", 10_895, 2_179, 128, 384, quick=True, smoke=dict(nq=24, nv=20, L=8, D=32)),
    SimilarityShape("tvr-topk", 10_895, 2_179, 128, 384, k=100, quick=True,
                    smoke=dict(nq=24, nv=20, L=8, D=32, k=5)),  # the top-k register path
    SimilarityShape("corpus-topk", 10_000, 100_000, 32, 512, k=100,
                    smoke=dict(nq=12, nv=300, L=2, D=16, k=130)),  # the chunked top-k path
]


def _tier(shapes: list, tier: str, smoke_all: bool = False) -> list:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    if tier == "full":
        return list(shapes)
    if tier == "quick":
        return [s for s in shapes if s.quick]
    return [replace(s, **s.smoke) for s in shapes if s.smoke is not None and (s.quick or smoke_all)]


def attention_shapes(tier: str) -> list[AttentionShape]:
    """The ``windowed_attention`` shapes of a tier (``full``, ``quick`` or ``smoke``)."""
    return _tier(ATTENTION, tier)


def similarity_shapes(tier: str) -> list[SimilarityShape]:
    """The ``max_similarity`` / ``max_similarity_topk`` shapes of a tier; the smoke tier has every
    shape (corpus-topk at CPU size takes the chunked top-k path)."""
    return _tier(SIMILARITY, tier, smoke_all=True)


def tier_for(device: torch.device, quick: bool) -> str:
    """What a script runs: the GPU its full or quick tier, a CPU the smoke tier."""
    return ("quick" if quick else "full") if torch.device(device).type == "cuda" else "smoke"
