"""benchmarks/roofline.py: the floors printed beside every benchmark figure, and the predicted
column of benchmarks/RESULTS.md, which must be the script's output (not edited by hand)."""

from __future__ import annotations

import math

from benchmarks import roofline


def test_attention_floor_counts_each_tensor_once():
    B, H, L, D = 256, 8, 128, 64
    nbytes, flops = roofline.attention_cost(B, H, L, D, "bf16", "fwd")
    assert nbytes == 4 * B * H * L * D * 2 + 2 * B * H * L * 4  # q, k, v, o + sigma, lse
    assert flops == 2 * 2 * B * H * L * L * D  # QK^T and PV
    floor, by_bytes, by_flops = roofline.floor_ms(nbytes, flops)
    assert floor == by_bytes > by_flops and math.isclose(by_bytes, nbytes / 4.3e12 * 1e3)
    bwd_bytes, bwd_flops = roofline.attention_cost(B, H, L, D, "bf16", "bwd")
    both = roofline.attention_cost(B, H, L, D, "bf16", "fwd+bwd")
    assert both == (nbytes + bwd_bytes, flops + bwd_flops) and bwd_flops == 5 * flops // 2
    # with a cutoff each query sees its window only: 2 * floor(3 * 64) + 1 keys
    assert roofline.attention_keys_per_query(16384, 64.0, 3.0) == 385
    assert roofline.attention_cost(2, 8, 16384, 64, "bf16", "fwd", 64.0, 3.0)[1] == 4 * 2 * 8 * 16384 * 385 * 64
    assert roofline.attention_cost(1, 1, 8, 16, "fp32", "fwd")[0] == 4 * 8 * 16 * 4 + 2 * 8 * 4


def test_similarity_floor():
    nbytes, flops = roofline.similarity_cost(640, 128, 128, 384, None, False)
    assert nbytes == (640 + 128 * 128) * 384 * 2 + 640 * 128 * 12 and flops == 2 * 640 * 128 * 128 * 384
    topk_bytes, topk_flops = roofline.similarity_cost(640, 128, 128, 384, 10, False)
    assert topk_flops == flops and topk_bytes == nbytes - 640 * 118 * 12
    train = roofline.similarity_cost(640, 128, 128, 384, None, True)
    assert train[1] == flops + 4 * 640 * 128 * 384


def test_results_md_holds_the_generated_predictions():
    """RESULTS.md's block is `python benchmarks/roofline.py --write` output: the targets' predicted
    floors cell for cell (the measured / met cells are the lead's to fill) and the shape table."""
    have = roofline.results_block(roofline.RESULTS.read_text()).splitlines()
    want = roofline.markdown().splitlines()
    assert len(have) == len(want), "RESULTS.md's roofline block is stale: run python benchmarks/roofline.py --write"
    n_targets = len(roofline.TARGETS) + 2
    for got, expected in zip(have[:n_targets], want[:n_targets]):
        assert got.split("|")[1:5] == expected.split("|")[1:5], (got, expected)
    assert have[n_targets:] == want[n_targets:]
