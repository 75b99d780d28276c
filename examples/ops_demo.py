"""A short tour of the three ops on random data: shapes, the impl each call used, and a check of
every available fast path against the reference.

Run: python examples/ops_demo.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import kdc_kernels as K
from kdc_kernels import testing
from kdc_kernels.info import auto_choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda if available, else cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    picks = auto_choices(device.type)
    print(f"device: {device}; auto picks: {picks}")

    attn = testing.attention_inputs(8, 4, 64, 32, R=8, device=device, requires_grad=True, seed=1)
    t0 = time.perf_counter()
    out = K.windowed_attention(**attn, cutoff=3.0)
    out.square().sum().backward()
    print(f"windowed_attention  out {tuple(out.shape)}  d rel_bias {tuple(attn['rel_bias'].grad.shape)}  "
          f"d sigma {tuple(attn['sigma'].grad.shape)}  ({time.perf_counter() - t0:.3f}s fwd+bwd)")

    sim = testing.similarity_inputs(256, 64, 32, 128, device=device, seed=2)
    score, index = K.max_similarity(**sim, return_index=True)
    print(f"max_similarity      score {tuple(score.shape)} {score.dtype}  index {tuple(index.shape)}  "
          f"mean best score {score.mean():.4f}")
    top_s, top_i = K.max_similarity_topk(**sim, k=5)
    agree = torch.equal(top_i[:, 0], score.argmax(dim=1))
    print(f"max_similarity_topk top-5 of query 0: {top_i[0].tolist()}  (top-1 agrees with argmax: {agree})")


if __name__ == "__main__":
    main()
