"""The fast paths of ``windowed_attention`` against the reference: one list of cases, one checker,
every implementation in every run mode (tests/ops/run_modes.py: ``triton-interpreter``,
``cuda-emulated`` (slow), ``triton-gpu`` and ``cuda-gpu`` (gpu)).

Every case runs forward and every gradient on fresh random inputs, with every buffer the
launchers and bindings allocate NaN-poisoned (``KDC_POISON_OUTPUTS=1``: an element a kernel
forgets to write fails the comparison). The cases break tiling: L = 1, odd sizes, one past a
block (packed 32/64, the 64-row CUDA blocks and 128-row Triton plans), several blocks, windows
that end exactly on block and warp edges, a long sequence with narrow windows; each of rel_bias /
sigma / cutoff / lengths / scale on and off; R = 0, small, > L; D = 5 .. 256; non-contiguous
inputs and upstream gradients. Each case says which dtypes each mode runs: fp32 on the CPU modes
(the interpreter also fp16/bf16 on a few cases: loads, casts and stores; the emulation fp16/bf16
wherever the CUDA tensor-core kernels have a distinct path), fp32/fp16/bf16 (or the dtypes the
case is about) on both GPU modes. A case written for one implementation's tiles runs in the other
implementation's CPU mode too, except where that costs seconds on the interpreter and adds no
block edge of its own (``CUDA_TILES``).

The checker (:func:`check`) follows the contract: fp32 within 1e-4 (TF32: 1e-3) of the reference,
fp16/bf16 within twice the reference's own error in that dtype plus a small floor, both scaled by
``max(1, max|ref|)``; the reference runs in fp32 on the same (rounded) input values.

Implementation-specific checks follow the shared ones: Triton tile plans, visit logs, launch hooks
and implementation choice here; the CUDA bindings, tensor-core launch counts and the CUDA kernels'
excluded-position tests stay in test_cuda_ops.py.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

import pytest
import torch
import triton

import kdc_kernels as K
from kdc_kernels import _backend, _config, _launch, testing
from kdc_kernels.nn import DynamicTemporalAttention
from kdc_kernels.ops.windowed_attention import _triton as wa_triton
from kdc_kernels.ops.windowed_attention import windowed_attention_ref
from tests.ops import launch_spy, run_modes

GRAD_NAMES = ("q", "k", "v", "rel_bias", "sigma")
DTYPES = run_modes.DTYPES


@pytest.fixture(autouse=True)
def _poisoned_buffers(monkeypatch):
    """Every buffer the launchers / bindings allocate starts as NaN (-1 for integers)."""
    monkeypatch.setenv("KDC_POISON_OUTPUTS", "1")


# ------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """One shape and set of optional inputs. ``layout``: None, ``"bh"`` (inputs built transposed,
    dO strided over B and H) or ``"ld"`` (inputs and dO transposed in L and D); ``table``:
    ``"fp32"`` or ``"input"`` (rel_bias and sigma in the inputs' dtype); ``window``: None, a
    constant sigma (``cutoff * sigma`` an integer: windows end on block edges) or ``"long"`` (sigma
    in [1, 4] with one row of 40, lengths [L - 3]); ``gpu_L``: L on a GPU when it differs."""

    name: str
    B: int
    H: int
    L: int
    D: int
    R: int | None = 2
    sigma: bool = True
    lengths: str | None = "ragged"
    cutoff: float | None = None
    scale: float | None = None
    layout: str | None = None
    table: str = "fp32"
    window: float | str | None = None
    gpu_L: int | None = None
    seed: int = 0
    interpreter: tuple = ("fp32",)
    emulated: tuple = ("fp32",)
    gpu: tuple = ("fp32", "fp16", "bf16")

    def dtypes(self, mode: str) -> tuple:
        return {"triton-interpreter": self.interpreter, "cuda-emulated": self.emulated}.get(mode, self.gpu)

    def inputs(self, device: torch.device, dtype: torch.dtype) -> dict:
        L = self.gpu_L if self.gpu_L and device.type == "cuda" else self.L
        args = testing.attention_inputs(self.B, self.H, L, self.D, R=self.R, sigma=self.sigma, lengths=self.lengths,
                                        dtype=dtype, device=device, noncontiguous=self.layout is not None,
                                        seed=self.seed)
        if self.window == "long":
            g = testing.make_generator(self.seed)
            sigma = 1.0 + 3.0 * torch.rand(self.B, self.H, L, generator=g)
            sigma[0, -1, 7] = 40.0  # one wide row widens its whole query block
            args["sigma"] = sigma.to(device)
            args["lengths"] = torch.full((self.B,), L - 3, device=device)
        elif self.window is not None:
            args["sigma"] = torch.full((self.B, self.H, L), float(self.window), device=device)
        if self.table == "input":
            args.update({n: args[n].to(dtype) for n in ("rel_bias", "sigma") if args[n] is not None})
        return args

    def dout(self, shape, device, dtype) -> torch.Tensor:
        g = testing.make_generator(self.seed + 1)
        if self.layout == "ld":  # transposed in L and D
            dout = torch.randn(*shape[:2], shape[3], shape[2], generator=g)
            return dout.to(device=device, dtype=dtype).transpose(-1, -2)
        dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        if self.layout == "bh":  # strided like a permuted view
            dout = dout.transpose(0, 1).contiguous().transpose(0, 1)
        return dout


LOW = ("fp32", "fp16", "bf16")
BF16 = ("fp32", "bf16")
# Written for the CUDA kernels' 64-row blocks and 16-row warps and costly on the interpreter: the
# emulation and the GPUs run them (the interpreter runs every other case of the list).
CUDA_TILES = dict(interpreter=(), emulated=BF16, gpu=BF16)
CASES = [
    # whole sequences (one program owns them; short ones packed several to a tile)
    Case("L1", 3, 2, 1, 16, lengths=None, seed=2),
    Case("tiny", 1, 1, 1, 8, lengths=None, seed=3, emulated=BF16, gpu=BF16),
    Case("odd", 2, 3, 7, 5, R=3, seed=3, emulated=LOW),
    Case("L5-R0-cutoff", 3, 2, 5, 32, R=0, cutoff=1.5, seed=12),
    Case("R>L", 2, 1, 9, 12, R=20, cutoff=1.5, seed=3, emulated=BF16, gpu=BF16),
    Case("L32-R32-packed", 3, 2, 32, 64, R=32, seed=14),
    Case("L32-D128-scale", 2, 1, 32, 128, scale=0.3, seed=14),
    Case("L33-no-sigma", 3, 2, 33, 16, sigma=False, seed=12),
    Case("L33-oddD-no-bias", 2, 2, 33, 33, R=None, lengths="full", cutoff=2.0, seed=16),
    Case("L33-low-tables", 3, 2, 33, 16, R=4, cutoff=2.0, table="input", interpreter=("fp16", "bf16"),
         emulated=("fp16", "bf16"), gpu=("fp16", "bf16")),
    Case("L33-noncontiguous", 3, 2, 33, 16, cutoff=2.0, layout="bh", seed=17),
    Case("bias-only", 1, 2, 33, 64, R=0, sigma=False, lengths="full", seed=3, emulated=BF16, gpu=BF16),
    Case("D=130", 2, 1, 33, 130, lengths=None, seed=3, emulated=BF16, gpu=BF16),
    Case("L40-noncontiguous", 2, 2, 40, 24, R=3, cutoff=2.5, layout="ld", seed=5, emulated=BF16, gpu=BF16),
    Case("D=256", 1, 1, 40, 256, cutoff=3.0, seed=3, gpu=("fp32",)),
    # one past a packed block / one 64-row block / the first tiled sizes
    Case("block", 2, 2, 64, 32, R=4, cutoff=2.0, seed=3, emulated=LOW),
    Case("L64-R32-narrow-cutoff", 2, 2, 64, 16, R=32, cutoff=0.7, seed=21),
    Case("L64-plain", 2, 1, 64, 32, R=None, sigma=False, lengths=None, seed=9),
    Case("block+1", 2, 2, 65, 16, R=1, scale=0.7, seed=3, emulated=BF16, gpu=BF16),
    Case("plain", 2, 2, 65, 20, R=None, sigma=False, lengths=None, seed=3, emulated=BF16, gpu=BF16),
    Case("D=100", 1, 1, 70, 100, R=3, seed=3, emulated=BF16, gpu=BF16),
    Case("L100-one-query-block", 3, 2, 100, 64, R=8, seed=20),  # up to L = 128 a Triton program owns the sequence
    Case("L129-tiled-cutoff", 2, 2, 129, 16, R=32, cutoff=3.0, seed=17),
    Case("L129-tiled-wide-bias", 1, 2, 129, 64, R=100, sigma=False, lengths=None, seed=20),
    Case("3-blocks", 1, 2, 130, 64, R=5, cutoff=1.0, seed=3, emulated=LOW),
    # cutoff * sigma an exact integer: windows end exactly on the key blocks (64) and on the
    # 16-row warp boundaries, where an off-by-one in the key range or the skipping drops a key
    # (the Triton kernels' own block edges: test_triton_boundaries.py)
    Case("window_edges_w1", 1, 2, 130, 16, lengths=None, cutoff=1.0, window=1.0, seed=130, **CUDA_TILES),
    Case("window_edges_w2", 1, 2, 129, 16, lengths=None, cutoff=1.0, window=2.0, seed=129, **CUDA_TILES),
    Case("window_edges_w64", 1, 2, 200, 16, lengths=None, cutoff=1.0, window=64.0, seed=200, **CUDA_TILES),
    Case("window_edges_w16", 1, 2, 200, 16, lengths=None, cutoff=1.0, window=16.0, seed=200, **CUDA_TILES),
    # key blocks outside the window skipped; rows of very different widths share a block
    Case("long-window", 1, 2, 520, 16, R=4, lengths=None, cutoff=3.0, window="long", gpu_L=3000, seed=11,
         **CUDA_TILES),
]
CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES)


def matrix(cases=CASES) -> list:
    """``(mode, case, dtype)`` for every mode and every dtype the case runs there."""
    out = []
    for mode in run_modes.NAMES:
        for case in cases:
            for dt in case.dtypes(mode):
                out.append(pytest.param(mode, case, dt, id=f"{mode}-{case.name}-{dt}", marks=run_modes.MARKS[mode]))
    return out


# ---------------------------------------------------------------------------------- the checker
def run(fn, args: dict, dout: torch.Tensor, grads=GRAD_NAMES, **kw):
    """Output and ``{name: grad}`` of ``fn(**args, **kw)`` on fresh leaves (same strides)."""
    x = {n: (t.detach().clone().requires_grad_(n in grads) if n in GRAD_NAMES and t is not None else t)
         for n, t in args.items()}
    out = fn(**x, **kw)
    wrt = [n for n in grads if x[n] is not None]
    return out, dict(zip(wrt, torch.autograd.grad(out, [x[n] for n in wrt], dout)))


def check(mode: run_modes.RunMode, args: dict, dout: torch.Tensor, *, cutoff=None, scale=None) -> None:
    """Output and every gradient of ``mode`` against the reference (the contract's rule for the
    inputs' dtype; see the module docstring)."""
    dtype = args["q"].dtype
    out, grads = run(mode.windowed_attention, args, dout, cutoff=cutoff, scale=scale)
    assert out.dtype == dtype and out.shape == args["q"].shape
    up = {n: (t.float() if n in ("q", "k", "v") else t) for n, t in args.items()}  # the same values in fp32
    ref, ref_grads = run(windowed_attention_ref, up, dout.float(), cutoff=cutoff, scale=scale)
    low, low_grads = (None, {}) if dtype == torch.float32 else run(windowed_attention_ref, args, dout, cutoff=cutoff,
                                                                   scale=scale)
    testing.check_fast_path(out, ref, low, dtype=dtype, tf32=mode.tf32, name="out")
    assert set(grads) == set(ref_grads)
    for n, grad in grads.items():
        assert grad.dtype == args[n].dtype, f"d{n} has dtype {grad.dtype}, expected {args[n].dtype}"
        testing.check_fast_path(grad, ref_grads[n], low_grads.get(n), dtype=dtype, tf32=mode.tf32, name=f"d{n}")


def check_case(mode: run_modes.RunMode, case: Case, dtype: torch.dtype, seed: int | None = None) -> None:
    if seed is not None:
        case = replace(case, seed=seed)
    args = case.inputs(mode.device, dtype)
    check(mode, args, case.dout(args["q"].shape, mode.device, dtype), cutoff=case.cutoff, scale=case.scale)


@pytest.mark.parametrize("mode,case,dtype", matrix(), indirect=["mode"])
def test_matches_reference(mode, case, dtype):
    check_case(mode, case, DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_bias_bin_summing_every_row_in_low_precision(mode, dtype):
    """With R = 0 the single bias bin sums dS over every (i, j) of a head, and sum_j dS[i, j] = 0
    exactly. Delta computed from the stored fp16/bf16 output left each row's sum at the rounding
    error of O (the GPU run saw 0.0184 > 0.01 in bf16, 0.0047 > 0.002 in fp16 on Triton at
    L5-R0-cutoff; seeds 0-3 failed the same way on the interpreter); the fused Triton backward
    takes Delta from its own tile."""
    for seed in range(4):
        check_case(mode, CASES_BY_NAME["L5-R0-cutoff"], DTYPES[dtype], seed=seed)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_upstream_gradient_of_a_sum(mode, dtype):
    """A stride-0 upstream gradient (the backward of ``out.sum()``) is read correctly."""
    case = CASES_BY_NAME["L40-noncontiguous"]
    args = case.inputs(mode.device, DTYPES[dtype])
    dout = torch.ones(1, device=mode.device, dtype=DTYPES[dtype]).expand(args["q"].shape)
    assert dout.stride() == (0, 0, 0, 0)
    check(mode, args, dout, cutoff=case.cutoff)


def test_only_requested_gradients(mode):
    """d sigma / d rel_bias are computed only when asked for; the others still match."""
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        args = testing.attention_inputs(2, 2, 33, 16, R=3, dtype=dtype, device=mode.device)
        dout = torch.randn(args["q"].shape, generator=testing.make_generator(1)).to(mode.device, dtype)
        up = {n: (t.float() if n in ("q", "k", "v") else t) for n, t in args.items()}
        for grads in (("q", "rel_bias"), ("v", "sigma"), ("k",)):
            _, got = run(mode.windowed_attention, args, dout, grads=grads, cutoff=2.0)
            _, want = run(windowed_attention_ref, up, dout.float(), grads=grads, cutoff=2.0)
            _, low = run(windowed_attention_ref, args, dout, grads=grads, cutoff=2.0)
            assert set(got) == set(grads)
            for n in grads:
                testing.check_fast_path(got[n], want[n], low[n], dtype=dtype, tf32=mode.tf32, name=f"d{n}")


@pytest.mark.parametrize("layout", ["ragged-narrow", "lengths-1-7"])
def test_padded_rows_zero_output_zero_grad_finite_lse(mode, layout):
    """Through the registered forward op (out and lse): padded rows have out = 0, lse = 0 and zero
    gradients; everything is finite (windows that shrink to the diagonal included)."""
    if layout == "ragged-narrow":
        args = testing.attention_inputs(3, 2, 40, 16, R=3, device=mode.device)
        args["sigma"][0, 0, :5] = 1e-3  # windows that shrink to the diagonal
        cutoff, weight = 1.0, None
    else:
        args = testing.attention_inputs(3, 2, 20, 8, R=2, lengths=None, device=mode.device, seed=12)
        args["lengths"] = torch.tensor([20, 1, 7], device=mode.device)
        cutoff, weight = 0.8, torch.randn(3, 2, 20, 8, generator=testing.make_generator(13)).to(mode.device)
    D = args["q"].shape[-1]
    leaves = {n: args[n].clone().requires_grad_(True) for n in GRAD_NAMES}
    out, lse = mode.windowed_attention_fwd_op()(*(leaves[n] for n in GRAD_NAMES), args["lengths"], D**-0.5, cutoff)
    (out.float().square() if weight is None else out * weight).sum().backward()
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    for b, n in enumerate(args["lengths"].tolist()):
        assert torch.all(out[b, :, n:] == 0) and torch.all(lse[b, :, n:] == 0)
        for name in ("q", "k", "v", "sigma"):
            grad = leaves[name].grad
            assert torch.isfinite(grad).all()
            assert torch.all(grad[b, :, n:] == 0), f"d{name} is not zero on padded positions of batch row {b}"
    assert torch.isfinite(leaves["rel_bias"].grad).all()


@pytest.mark.parametrize("L", [37, 131])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0
def test_rows_holding_a_non_finite_key_pass_no_gradient(mode, L):
    """A valid key whose k or v holds NaN/inf poisons exactly the rows whose window holds it
    (output NaN): whatever their dO, it reaches no gradient (bit for bit the gradients of the
    same call with dO = 0 on those rows), for whole sequences (L = 37: Triton's fused backward)
    and tiled ones (L = 131)."""
    B, H, D, cutoff, j0 = 2, 2, 16, 2.0, 5
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        args = testing.attention_inputs(B, H, L, D, R=3, lengths="full", dtype=dtype, device=mode.device, seed=31)
        g = testing.make_generator(32)
        args["sigma"] = (0.5 + 2.5 * torch.rand(B, H, L, generator=g)).to(mode.device)
        args["k"][0, :, j0, 0] = float("nan")
        args["v"][0, :, j0, 1] = float("inf")
        with torch.no_grad():
            out = mode.windowed_attention(**args, cutoff=cutoff)
        poisoned = torch.isnan(out).any(-1)
        touch = (torch.arange(L, device=mode.device) - j0).abs()[None, :] <= cutoff * args["sigma"][0]
        assert torch.equal(poisoned[0], touch) and not poisoned[1].any() and 0 < int(touch.sum()) < H * L // 4
        dout = torch.randn(B, H, L, D, generator=g).to(device=mode.device, dtype=dtype)
        _, grads = run(mode.windowed_attention, args, dout, cutoff=cutoff)
        _, quiet = run(mode.windowed_attention, args, dout.masked_fill(poisoned[..., None], 0.0), cutoff=cutoff)
        for n, grad in grads.items():
            assert torch.isfinite(grad).all(), f"d{n} is not finite"
            assert torch.equal(grad, quiet[n]), f"d{n}: the dO of a poisoned row reached it"


# Whole sequences and tiled ones, for the Triton kernels (packed with a fused backward; several
# blocks) and the CUDA kernels (packed slots; 64-row blocks): each CPU mode runs its own pair.
TRITON_PAIR = dict(emulated=(), gpu=LOW)
CUDA_PAIR = dict(interpreter=(), emulated=BF16, gpu=BF16)
DETERMINISM = [Case("fused", 3, 2, 32, 16, R=4, cutoff=4.0, **TRITON_PAIR),
               Case("tiled", 1, 2, 129, 16, R=40, cutoff=4.0, **TRITON_PAIR),
               Case("packed", 2, 2, 30, 32, R=6, cutoff=2.0, seed=13, **CUDA_PAIR),
               Case("long", 2, 2, 70, 32, R=6, cutoff=2.0, seed=13, **CUDA_PAIR)]


@pytest.mark.parametrize("how", ["KDC_DETERMINISTIC", "torch"])
def test_deterministic_mode(mode, how, monkeypatch):
    """Deterministic mode (``KDC_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms``):
    two runs give bitwise identical outputs and gradients (on a GPU they also match the reference:
    the pinned configs differ from the tuned ones). Triton: the launch policy gives every kernel the
    op launches its pinned config without timing anything (on the interpreter too, where the launch
    itself ignores configs: tests/ops/launch_spy.py), and outside deterministic mode the same spy
    sees autotuning (the control)."""
    if how == "KDC_DETERMINISTIC":
        monkeypatch.setenv("KDC_DETERMINISTIC", "1")
    else:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    monkeypatch.delenv("KDC_AUTOTUNE", raising=False)  # pinned by deterministic mode alone
    assert _config.deterministic()
    spy = launch_spy.record(monkeypatch) if mode.impl == "triton" else None
    cases = [c for c in DETERMINISM if c.dtypes(mode.name)]
    for case in cases if how == "KDC_DETERMINISTIC" else cases[:1]:
        for dt in case.dtypes(mode.name):
            args = case.inputs(mode.device, DTYPES[dt])
            dout = case.dout(args["q"].shape, mode.device, DTYPES[dt])
            first = run(mode.windowed_attention, args, dout, cutoff=case.cutoff)
            second = run(mode.windowed_attention, args, dout, cutoff=case.cutoff)
            assert torch.equal(first[0], second[0])
            for n in first[1]:
                assert torch.equal(first[1][n], second[1][n]), f"d{n} differs between two runs"
            if mode.gpu:
                check(mode, args, dout, cutoff=case.cutoff)
    if spy is not None:
        spy.assert_pinned()
        if mode.interpreted and how == "KDC_DETERMINISTIC":  # the control (a GPU would autotune for real)
            monkeypatch.delenv("KDC_DETERMINISTIC", raising=False)
            monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
            spy.clear()
            args = DETERMINISM[0].inputs(mode.device, torch.float32)
            with torch.no_grad():
                mode.windowed_attention(**args, cutoff=4.0)
            spy.assert_autotuned()


# ---------------------------------------------------------------- torch.library and compile
def test_opcheck_forward_and_backward_ops(mode):
    args = testing.attention_inputs(2, 2, 5, 16, R=2, seed=4, device=mode.device)
    q, k, v, bias, sigma, lengths = (args[n] for n in ("q", "k", "v", "rel_bias", "sigma", "lengths"))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias, sigma)]
    fwd = mode.windowed_attention_fwd_op()
    torch.library.opcheck(fwd.default, (*leaves, lengths, 0.25, 2.0))
    torch.library.opcheck(fwd.default, (q, k, v, None, None, None, 0.25, None))
    out, lse = fwd(q, k, v, bias, sigma, lengths, 0.25, 2.0)
    dout = torch.randn_like(out)
    if mode.impl == "triton":
        torch.library.opcheck(torch.ops.kdc_triton.windowed_attention_bwd.default,
                              (dout, q, k, v, out, lse, bias, sigma, lengths, 0.25, 2.0, True, True))
    else:
        torch.library.opcheck(torch.ops.kdc.cuda_windowed_attention_bwd.default,
                              (dout, q, k, v, bias, sigma, lengths, out, lse, 0.25, 2.0))


def _compile_backend(mode) -> str:
    """CPU: aot_eager (dynamo capture, fake tensors, AOT autograd through the registered ops;
    inductor's C++ build would take minutes here); a GPU: inductor."""
    return "inductor" if mode.gpu else "aot_eager"


@pytest.mark.parametrize("mode", run_modes.params("cuda-emulated", "triton-gpu", "cuda-gpu"), indirect=True)
def test_compile_fullgraph_op(mode):
    """torch.compile(fullgraph=True) of the op (validation, dispatch, the registered ops and
    their autograd) matches the eager reference, output and every gradient (the interpreter: the
    layer test below)."""
    args = testing.attention_inputs(2, 2, 9, 8, R=2, seed=14, device=mode.device)
    compiled = torch.compile(mode.windowed_attention, fullgraph=True, backend=_compile_backend(mode))
    dout = torch.randn(args["q"].shape, generator=testing.make_generator(15)).to(mode.device)
    out, grads = run(compiled, args, dout, cutoff=1.5)
    ref, ref_grads = run(windowed_attention_ref, args, dout, cutoff=1.5)
    testing.check_fast_path(out, ref, tf32=mode.tf32, name="compiled out")
    for n in ref_grads:
        testing.check_fast_path(grads[n], ref_grads[n], tf32=mode.tf32, name=f"compiled d{n}")


@pytest.mark.parametrize("mode", run_modes.params("triton-interpreter", "triton-gpu", "cuda-gpu"), indirect=True)
def test_compile_fullgraph_nn_layer(mode):
    """torch.compile(fullgraph=True) of the DTA layer on the fast path matches the eager reference
    (the layer reaches the fast path through the public API, which the emulation is not behind)."""
    torch.manual_seed(0)
    layer = DynamicTemporalAttention(32, 2, max_rel_dist=4, cutoff=3.0, impl=mode.impl).to(mode.device)
    with torch.no_grad():
        layer.rel_bias.normal_()
    eager = copy.deepcopy(layer)
    eager.impl = "reference"
    x = torch.randn(2, 7, 32, device=mode.device)
    lengths = torch.tensor([7, 3], device=mode.device)
    compiled = torch.compile(layer, fullgraph=True, backend=_compile_backend(mode))
    y = compiled(x, lengths)
    y_ref = eager(x, lengths)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    testing.check_fast_path(y, y_ref, tf32=mode.tf32, name="y")
    for (name, p), p_ref in zip(layer.named_parameters(), eager.parameters()):
        testing.check_fast_path(p.grad, p_ref.grad, tf32=mode.tf32, name=f"d{name}")


# ==================================================================================== Triton only
# Tile plans, visit logs and launch hooks of kdc_kernels/ops/windowed_attention/_triton.py.


@pytest.mark.parametrize("mode", run_modes.params("triton-interpreter"), indirect=True)
@pytest.mark.parametrize("L", [33, 100, 128])
def test_forward_reads_keys_and_values_once_up_to_128(mode, L, monkeypatch):
    """Up to L = 128 one forward program owns every query of its sequences, so each key/value
    block of a sequence is loaded by one program, once (counted per program under the
    interpreter). From L = 65 on the interpreter runs the GPU plan itself; the GPU plans at the
    PRVR shapes (B = 256, D = 64 or 128) hold the whole sequence in one query block too."""
    log = []
    monkeypatch.setattr(_launch.hooks, "visit_log", log)
    args = testing.attention_inputs(3, 2, L, 64, R=4, lengths="full")
    with torch.no_grad():
        K.windowed_attention(**args, impl="triton")
    (fwd,) = log
    assert fwd["unwritten"] == 0
    assert fwd["blocks_per_sequence"] == 1, f"{fwd['blocks_per_sequence']} programs read the keys of a sequence"
    key_blocks = triton.cdiv(L, fwd["BN"])
    assert fwd["max_per_program"] == key_blocks and fwd["visited"] == fwd["programs"] * key_blocks, fwd
    if L > 64:
        assert wa_triton._fwd_tiles(3, L, 64, interpret=True) == wa_triton._fwd_tiles(3, L, 64, interpret=False)
    for D in (64, 128):
        t = wa_triton._fwd_tiles(256, L, D, interpret=False)
        assert triton.cdiv(L, t.BM) == 1 and t.G * t.BM >= 16, (L, D, t)


@pytest.mark.parametrize("mode", run_modes.params("triton-interpreter"), indirect=True)
@pytest.mark.parametrize("case", [Case("fused", 3, 2, 33, 16, sigma=False, seed=5),
                                  Case("tiled", 1, 1, 129, 16, R=32, cutoff=3.0, seed=5)], ids=["fused", "tiled"])
def test_native_fp16_dots_on_interpreter(mode, case, monkeypatch):
    """The GPU's dtype path (fp16 tiles into the dots, P and dS rounded to fp16) on the interpreter."""
    monkeypatch.setattr(_launch.hooks, "native_dots", True)
    check_case(mode, case, torch.float16)


def _long_case(L, device="cpu", seed=0):
    """Two sequences (one ragged) with narrow windows: sigma in [0.5, 4], cutoff 3."""
    args = testing.attention_inputs(2, 1, L, 16, R=8, lengths=None, device=device, seed=seed)
    g = testing.make_generator(seed + 7)
    args["sigma"] = (0.5 + 3.5 * torch.rand(2, 1, L, generator=g)).to(device)
    args["lengths"] = torch.tensor([L, L // 2 + 3], device=device)
    return args


@pytest.mark.parametrize("mode", run_modes.TRITON_MODES, indirect=True)
def test_cutoff_skips_key_blocks_and_scales_linearly(mode, monkeypatch):
    """With a cutoff each tile visits only the key (query) blocks its window reaches, so the
    visited count grows linearly with L, not quadratically; the long result matches the reference."""
    counts = {}
    for L in (512, 1024):
        log = []
        monkeypatch.setattr(_launch.hooks, "visit_log", log)
        args = _long_case(L, mode.device)
        dout = torch.randn_like(args["q"])
        out, grads = run(mode.windowed_attention, args, dout, cutoff=3.0)
        for entry in log:
            assert entry["unwritten"] == 0, entry
            assert entry["visited"] < entry["total"] / 2, f"{entry['kernel']} visited too many blocks: {entry}"
        counts[L] = {e["kernel"]: e for e in log}
        if L == 1024:
            ref, ref_grads = run(windowed_attention_ref, args, dout, cutoff=3.0)
            testing.check_fast_path(out, ref, tf32=mode.tf32, name="out")
            for n, grad in grads.items():
                testing.check_fast_path(grad, ref_grads[n], tf32=mode.tf32, name=f"d{n}")
    assert set(counts[512]) == {"fwd", "bwd_q", "bwd_kv"}
    for kernel in counts[512]:
        small, big = counts[512][kernel], counts[1024][kernel]
        assert big["total"] == 4 * small["total"]  # a dense kernel: quadratic
        assert big["visited"] <= 2.2 * small["visited"], (kernel, small, big)  # ours: linear


def test_short_sequences_are_packed():
    """L <= 64: several whole sequences per program (L = 32: two in a 64 x 64 tile, not one in a
    128-row tile), and the backward owns whole sequences (one fused kernel, no atomics) up to
    L = 128 at D = 64."""
    t = wa_triton._fwd_tiles(256, 32, 64)
    assert (t.G, t.BM, t.BN) == (2, 32, 32)
    assert wa_triton._fwd_tiles(256, 8, 64).G == 2 and wa_triton._fwd_tiles(256, 1, 64).G == 16
    fused, _, tb = wa_triton._bwd_tiles(256, 32, 64)
    assert fused and tb.G == 2 and tb.BN == 32
    assert wa_triton._bwd_tiles(256, 128, 64)[0] and not wa_triton._bwd_tiles(256, 129, 64)[0]
    for B, L, D in ((1, 1, 16), (3, 5, 16), (256, 1, 64), (2, 33, 128), (2, 4000, 64)):
        t = wa_triton._fwd_tiles(B, L, D)
        fused, tq, tkv = wa_triton._bwd_tiles(B, L, D)
        for tiles in (t, tq, tkv):  # every tile keeps >= 16 rows and columns for tl.dot
            assert tiles.G * tiles.BM >= 16 and tiles.G * tiles.BN >= 16, (B, L, D, tiles)


def test_ieee_fp32_takes_the_cuda_core_plans(monkeypatch):
    """fp32 inputs with IEEE dots (the precision rule's default on a GPU) run their dots on the
    CUDA cores: their plans have one pipeline stage and smaller tiles (scripts/kernel_report.py
    proves they do not spill on sm_90), and up to L = 128 at D <= 128 the forward still reads K
    and V once. TF32 and fp16/bf16 keep the tensor-core plans; the interpreter ignores the flag."""
    rule = {"value": "ieee"}
    monkeypatch.setattr(_config, "fp32_dot_precision", lambda device_type: rule["value"])
    assert wa_triton._fma(torch.empty(1, device="meta"))
    assert not wa_triton._fma(torch.empty(1, device="meta", dtype=torch.bfloat16))
    rule["value"] = "tf32"
    assert not wa_triton._fma(torch.empty(1, device="meta"))
    for B, L, D in ((256, 32, 64), (256, 64, 64), (256, 100, 64), (256, 128, 64), (256, 128, 128),
                    (256, 32, 128), (2, 4096, 64), (2, 33, 256)):
        t = wa_triton._fwd_tiles(B, L, D, fma=True)
        fused, tq, tkv = wa_triton._bwd_tiles(B, L, D, elem_bytes=4, fma=True)
        for tiles in (t, tkv) + (() if fused else (tq,)):
            assert all(s == 1 for _, s in tiles.warps_stages), (B, L, D, tiles)
            assert tiles.G * tiles.BM >= 16 and tiles.G * tiles.BN >= 16, (B, L, D, tiles)
        if L <= 128 and D <= 128:
            assert triton.cdiv(L, t.BM) == 1, (B, L, D, t)
        assert fused == (L <= 64 and D <= 64), (B, L, D)
        assert wa_triton._fwd_tiles(B, L, D, interpret=True, fma=True) == wa_triton._fwd_tiles(B, L, D, interpret=True)
        assert wa_triton._bwd_tiles(B, L, D, True, 4, fma=True) == wa_triton._bwd_tiles(B, L, D, True, 4)


def test_poison_hook_fills_buffers(monkeypatch):
    assert torch.isnan(_launch.new_buffer("x", (4, 3), torch.float32, torch.device("cpu"))).all()
    assert (_launch.new_buffer("x", (4, 3), torch.int32, torch.device("cpu")) == -1).all()
    monkeypatch.setenv("KDC_POISON_OUTPUTS", "0")
    seen = []
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: seen.append(name))
    _launch.new_buffer("y", (2,), torch.float32, torch.device("cpu"))
    assert seen == ["y"]


# ------------------------------------------------------------------------- impl selection
def test_auto_never_picks_triton_on_cpu(monkeypatch):
    def boom(**_):
        raise AssertionError("auto picked the Triton kernels for CPU tensors")

    monkeypatch.setattr(wa_triton, "windowed_attention_triton", boom)
    args = testing.attention_inputs(2, 2, 6, 16, seed=3)
    ref = windowed_attention_ref(**args)
    for impl in (None, "auto"):
        torch.testing.assert_close(K.windowed_attention(**args, impl=impl), ref)
    assert _backend.resolve("windowed_attention", "auto", torch.device("cpu"), lambda name: []) == "reference"


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    # Triton decided interpreted vs compiled at import; only the reason check reads the flag again.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = testing.attention_inputs(2, 2, 6, 16, seed=3)
    with pytest.raises(NotImplementedError, match=re.escape("TRITON_INTERPRET=1")):
        K.windowed_attention(**args, impl="triton")


def test_unsupported_cases_name_every_reason():
    meta = dict(device="meta")
    q = torch.empty(2, 2, 4000, 300, **meta)
    bias = torch.empty(2, 2 * 3000 + 1, **meta).requires_grad_(True)
    reasons = wa_triton.windowed_attention_unsupported(q, q, q, rel_bias=bias)
    assert len(reasons) == 2
    assert "head dim D = 300" in reasons[0] and "bins" in reasons[1]
    assert wa_triton.windowed_attention_unsupported(q[..., :128], q[..., :128], q[..., :128],
                                                    rel_bias=bias.detach()) == []
    x = torch.randn(1, 1, 3, 300)
    with pytest.raises(NotImplementedError, match="head dim D = 300"):
        K.windowed_attention(x, x, x, impl="triton")
