"""Re-runs mutations of the CUDA tensor-core kernels (csrc/) on the CPU emulation.

Each mutation is a one-line edit of a csrc/ file, numbered as in the campaign table of
``tests/ops/test_cuda_ops.py`` (the edits below are those of the re-runs recorded there). For each:
copy the repository (without .git and caches) to a temporary folder, apply the edit, build the
emulation there (tests/cuda_emulation, about a minute on two cores) and run the emulated tests of
both ops with ``-x``; the first test that fails is printed (none: the mutation survived).

    python -m tests.ops.cuda_mutations              # every mutation listed here
    python -m tests.ops.cuda_mutations 2 14         # some of them
"""

from __future__ import annotations

import sys

from tests.ops.mutants import run_mutant

FWD = "csrc/windowed_attention/windowed_attention_tc_fwd.cu"
TILE = "csrc/windowed_attention/tc_tile.cuh"
SCORE = "csrc/max_similarity/tc_score.cuh"
TOPK = "csrc/max_similarity/max_similarity_topk.cu"
TESTS = ["tests/ops/test_windowed_attention_fast.py", "tests/ops/test_max_similarity_fast.py",
         "tests/ops/test_cuda_ops.py"]

# number -> (file, old text, new text, what it breaks)
MUTATIONS = {
    1: (FWD, "(j0 >= wkmax || j0 + BN <= wkmin)", "(j0 >= wkmax || j0 <= wkmin)",
        "fwd: per-warp window skipping drops the first tile a warp needs"),
    2: (FWD, "kmax = Wb < 0 ? 0 : min(len, bp.i0 + nrows + Wb);",
        "kmax = Wb < 0 ? 0 : min(len, bp.i0 + nrows + Wb - 1);",
        "fwd: block key range one key short (off-by-one tile edge)"),
    3: (TILE, "const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};\n      tc::mma_16816<T>(s[2 * np], a, b0);",
        "const uint32_t b0[2] = {b[2], b[3]}, b1[2] = {b[0], b[1]};\n      tc::mma_16816<T>(s[2 * np], a, b0);",
        "K B-fragment: the two 8-column halves swapped (fragment layout)"),
    6: (FWD, "tc::cp_async_wait<1>();  // Q and this tile have landed",
        "tc::cp_async_wait<2>();  // Q and this tile have landed",
        "fwd: cp.async.wait_group 2 instead of 1 (tile used before it lands)"),
    12: (TILE, "const bool ok = bh >= 0 && rr < pick(nvalid, s) - first && c * 8 < D;",
         "const bool ok = bh >= 0 && rr <= pick(nvalid, s) - first && c * 8 < D;",
         "staging: one row past the length loaded (length mask)"),
    14: (SCORE, "if (sim > best[h] || (isnan(sim) && !isnan(best[h]))) {",
         "if (sim >= best[h] || (isnan(sim) && !isnan(best[h]))) {",
         "max-sim: ties go to the last clip (>= instead of >)"),
    15: (SCORE, "if (c0 + c >= len_v) continue;", "if (c0 + c > len_v) continue;",
         "max-sim: one padded clip scored (off-by-one length mask)"),
    16: (SCORE, "for (int off = 1; off <= 2; off <<= 1) {", "for (int off = 1; off <= 1; off <<= 1) {",
         "max-sim: quad reduction misses the lanes 2 apart"),
    17: (SCORE, "if (nv < v_end) stage_item(nv, nc, 1 - buf);", "if (nv < v_end) stage_item(nv, nc, buf);",
         "max-sim: next clip tile staged into the buffer in use"),
    19: (TOPK, "slab[(warp * 16 + g) * kSplit + (v - v0)] = best[0];",
         "slab[(warp * 16 + g) * kSplit + (v - v0 + 1) % kSplit] = best[0];",
         "top-k: scores written one video off in the split slab"),
    27: (TOPK, "sort_rows<msim_tc::kWarps>(slab, ids, r, q_local0, v0, count);",
         "sort_rows<2 * msim_tc::kWarps>(slab, ids, r, q_local0, v0, count);",
         "top-k: rows sorted as if 8 warps ran (half never written)"),
}


def run(number: int) -> tuple[str, list[str]]:
    path, old, new, _ = MUTATIONS[number]
    return run_mutant(f"cuda-{number}", path, old, new, ["-x", "-m", "slow", "-k", "cuda-emulated", *TESTS],
                      timeout=3600)


def main(argv: list[str]) -> int:
    numbers = [int(a) for a in argv] or sorted(MUTATIONS)
    for number in numbers:
        status, failed = run(number)
        print(f"M{number} {MUTATIONS[number][3]}: {status}", flush=True)
        for test in failed:
            print(f"     {test}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
