"""Pictures for a run folder: training curves, recall per M/V bin, learned DTA window widths.

matplotlib is optional (``pip install matplotlib``): without it each function returns False and
the first call says so once in the log.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("kdcnet")
_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            log.warning("matplotlib is not installed: no plots in the run folder (pip install matplotlib)")
            _warned = True
        return None
    return plt


def training_curves(history: list[dict], path: str | os.PathLike) -> bool:
    """One panel per loss term (``loss/*`` keys) and one for validation SumR, against epoch."""
    plt = _pyplot()
    if plt is None or not history:
        return False
    terms = [k for k in history[0] if k.startswith("loss/")]
    panels = terms + ["val/SumR"]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    epochs = [h["epoch"] + 1 for h in history]
    for ax, key in zip(axes.flat, panels):
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker=".")
        ax.set_title(key.replace("loss/", "loss: ").replace("val/", "validation "), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def bin_recall(mv_bins: list[dict] | None, path: str | os.PathLike, title: str = "recall by M/V ratio") -> bool:
    """R@1/5/10/100 against the moment-to-video ratio bin, one line per K (query counts under the
    bin labels): how recall changes as the captioned moment gets shorter relative to its video."""
    plt = _pyplot()
    if plt is None or not mv_bins:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(mv_bins))
    for key in ("R@1", "R@5", "R@10", "R@100"):
        ax.plot(xs, [float("nan") if r[key] is None else r[key] for r in mv_bins], marker="o", label=key)
    ax.set_xticks(list(xs), [f"{r['bin']}\n{r['num_queries']} q" for r in mv_bins], fontsize=8)
    ax.set_ylim(0, 102)
    ax.set_ylabel("recall (%)")
    ax.set_xlabel("moment length / video length")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def window_widths(widths: dict | None, path: str | os.PathLike) -> bool:
    """Histogram of the learned DTA window widths sigma (frames), one series per branch."""
    plt = _pyplot()
    if plt is None or not widths or all(w is None or w.numel() == 0 for w in widths.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, w in widths.items():
        if w is not None and w.numel():
            ax.hist(w.numpy(), bins=50, alpha=0.6, label=f"{name} (median {float(w.median()):.1f})")
    ax.set_xlabel("window width sigma (frames)")
    ax.set_ylabel("frames x heads")
    ax.set_title("learned DTA window widths (test set)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
