"""Mutation campaign over the window, mask and tile-edge code of the Triton kernels.

Each mutation is a one-line edit of a kernel file. For each: copy the repository (without .git
and caches) to a temporary folder, apply the edit, run the boundary, contract and op tests on the
CPU interpreter there, and record which tests fail (a mutation no test kills is a gap in the
tests, or an equivalent change). The results are recorded in the docstring of
``tests/ops/test_triton_boundaries.py``.

    python -m tests.ops.triton_mutations              # every mutation (about a minute each)
    python -m tests.ops.triton_mutations 1 6 15       # some of them
    python -m tests.ops.triton_mutations --first      # stop each run at its first failing test
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.ops.mutants import run_mutant

WA = "kdc_kernels/ops/windowed_attention/_triton_kernels.py"  # the kernels
WL = "kdc_kernels/ops/windowed_attention/_triton.py"  # tile plans and launchers
MS = "kdc_kernels/ops/max_similarity/_triton.py"  # forward kernel and launchers
MB = "kdc_kernels/ops/max_similarity/_triton_bwd.py"  # backward kernel
MT = "kdc_kernels/ops/max_similarity/_triton_topk.py"  # top-k kernels
COMMON = ["tests/ops/test_triton_boundaries.py", "tests/ops/test_contract_v2.py"]
_WA_TESTS = COMMON + ["tests/ops/test_windowed_attention_fast.py"]
_MS_TESTS = COMMON + ["tests/ops/test_max_similarity_fast.py"]
TESTS = {WA: _WA_TESTS, WL: _WA_TESTS, MS: _MS_TESTS, MB: _MS_TESTS, MT: _MS_TESTS}

# (file, old text, new text, what it breaks)
MUTATIONS = [
    (WA, "lo = tl.maximum(start - wmax - 1.0, 0.0)", "lo = tl.maximum(start - wmax + 8.0, 0.0)",
     "window lower bound skips the block before"),
    (WA, "hi = tl.minimum(start + BLK + wmax + 1.0,", "hi = tl.minimum(start + BLK + 0.0 * wmax,",
     "window upper bound ignores the window"),
    (WA, "lo = tl.maximum(start - wmax - 1.0, 0.0)", "lo = tl.maximum(start - wmax - 65.0, 0.0)",
     "window lower bound one block too far (efficiency only)"),
    (WA, "return (lo // STEP) * STEP * any_ok, hi * any_ok", "return (lo // STEP) * STEP * any_ok, hi",
     "tiles without valid rows still visit blocks (efficiency only)"),
    (WA, "wmax = tl.max(tl.where(ok, win, 0.0), 0)", "wmax = tl.min(tl.where(ok, win, float('inf')), 0)",
     "the tile's window from its narrowest row"),
    (WA, "ok = ok & (tl.abs(d) <= win[:, None])", "ok = ok & (tl.abs(d) < win[:, None])",
     "cutoff boundary excluded"),
    (WA, "ok = (i[:, None] < n_i[:, None]) & (j[None, :] < n_i[:, None])", "ok = (i[:, None] < n_i[:, None]) & (j[None, :] >= 0)",
     "padded keys attended"),
    (WA, "ok = ok & (s_i[:, None] == s_j[None, :])", "ok = ok",
     "packed sequences attend to each other"),
    (WL, "sigma_max = sig.amax(-1).contiguous()", "sigma_max = sig.amin(-1).contiguous()",
     "key-side skipping from the narrowest window"),
    (WL, "sig = sig.masked_fill(torch.arange(L, device=dev) >= lengths[:, None, None], 0.0)", "sig = sig",
     "key-side skipping reads padded sigma"),
    (WA, "q = _load_rows(Q, _offsets(b_i, h, i, sq_b, sq_h, sq_l), row_ok,",
     "q = _load_rows(Q, _offsets(b_i, h, i, sq_b, sq_h, sq_l), row_in,", "padded query rows read"),
    (WA, "return s_j, j, b_j, col_in, tl.where(bad, 0.0, k).to(k.dtype), tl.where(bad, 0.0, v).to(v.dtype), flag",
     "return s_j, j, b_j, col_in, k, v, flag", "forward: non-finite keys/values not zeroed"),
    (WA, "    k = tl.where(k * 0.0 == 0.0, k, 0.0).to(k.dtype)\n", "",
     "backward: non-finite keys not zeroed"),
    (WA, "x, _d = _logits(q, k, flag[None, :], qk_scale,", "x, _d = _logits(q, k, 0.0, qk_scale,",
     "rows holding a non-finite key not poisoned"),
    (WA, "delta = tl.where(delta == delta, delta, 0.0)  # NaN (a poisoned row's output): P = 0 there, keep dS 0",
     "delta = delta", "a poisoned row's NaN Delta reaches the gradients"),
    (WA, "return tl.where(t == 0.0, 0.0, t / (sig * sig * sig))", "return t / (sig * sig * sig)",
     "d sigma 0/0 for tiny sigma"),
    (MS, "acc = tl.where((col_ok & (l < n_valid))[None, :], acc, float(\"-inf\"))",
     "acc = tl.where((col_ok & (l <= n_valid))[None, :], acc, float(\"-inf\"))", "first padded clip scored"),
    (MS, "arg = tl.where(upd, a + l0, arg)", "arg = tl.where(upd, a, arg)", "argmax loses the chunk offset"),
    (MS, "upd = m > best", "upd = m >= best", "a later clip chunk wins a tie"),
    (MB, "ok = ok & (s > float(\"-inf\"))", "ok = ok", "length-0 videos send gradient to dq"),
    (MB, "hit = end & (hits > 0.0)", "hit = end", "unchosen (padded) clips get NaN gradient"),
    (MT, "keys = tl.where((vv < Nv - v0)[None, :],", "keys = tl.where((vv <= Nv - v0)[None, :],",
     "top-k takes a video past the end (expected equivalent: it scores -inf and has the highest index)"),
    (WA, "    _store_rows(OUT, _offsets(b_i, h, i, H * L * D, L * D, D), row_in, dd, D,\n                tl.where(poison",
     "    _store_rows(OUT, _offsets(b_i, h, i, H * L * D, L * D, D), row_ok, dd, D,\n                tl.where(poison",
     "padded output rows left unwritten"),
    (MT, "ok = r_ok[:, None] & (col < n_cols)[None, :]", "ok = r_ok[:, None] & (col <= n_cols)[None, :]",
     "top-k merge reads one score past the working block"),
    (WA, "k = _load_rows(K, _offsets(b_j, h, j, sk_b, sk_h, sk_l), col_ok,",
     "k = _load_rows(K, _offsets(b_j, h, j, sk_b, sk_h, sk_l), col_in,", "padded keys read (expected equivalent)"),
    (MB, "g = tl.where(s > float(\"-inf\"), tl.load(g_ptr + n64 * s_gn + v064 * s_gv, mask=ok, other=0.0), 0.0)",
     "g = tl.load(g_ptr + n64 * s_gn + v064 * s_gv, mask=ok, other=0.0)", "length-0 videos send gradient to dc"),
    (WA, "    lse = tl.where(poisoned, float(\"inf\"), lse)\n", "",
     "a poisoned row's lse is 0, not +inf (its dO reaches the gradients)"),
]


def run(number: int, first_only: bool = False) -> tuple[str, list[str]]:
    path, old, new, _ = MUTATIONS[number - 1]
    return run_mutant(str(number), path, old, new,
                      ["-m", "not slow and not gpu", *(["-x"] if first_only else []), *TESTS[path]], timeout=1800)


def main(argv: list[str]) -> int:
    first_only = "--first" in argv  # stop at the first failing test (much faster on a busy machine)
    numbers = [int(a) for a in argv if a != "--first"] or range(1, len(MUTATIONS) + 1)
    for number in numbers:
        status, failed = run(number, first_only)
        path, _, _, what = MUTATIONS[number - 1]
        print(f"{number:2d} {Path(path).parent.name}: {what}: {status}", flush=True)
        for test in failed:
            print(f"     {test}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
