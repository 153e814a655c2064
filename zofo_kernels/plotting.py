"""PNG figures for training runs, the SST-2 study and the benchmarks (matplotlib, Agg)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"bilevel-zofo": "tab:red", "mezo": "tab:blue", "mezo-lora": "tab:cyan",
          "fo-lora": "tab:green", "fo-full": "tab:purple", "zo": "tab:red",
          "mezo-ref": "tab:blue", "forward": "tab:gray", "inference": "tab:gray"}


def plot_run(history: Sequence[dict], path, title: str = "") -> Path:
    """Training loss and eval accuracy against training wall time (one run's metrics.jsonl
    rows)."""
    path = Path(path)
    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax1.plot([r["wall_time_s"] for r in train], [r["loss_avg"] for r in train], lw=1)
    ax1.set_xlabel("training wall time (s)")
    ax1.set_ylabel("training loss (mean since last row)")
    ax1.grid(alpha=0.3)
    if evals:
        ax2.plot([r["wall_time_s"] for r in evals], [r["eval_accuracy"] for r in evals],
                 marker="o", ms=3)
    ax2.set_xlabel("training wall time (s)")
    ax2.set_ylabel("eval accuracy")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(curves: Dict[str, List[Sequence[dict]]], path, title: str = "",
               reference: Optional[float] = None, reference_label: str = "") -> Path:
    """Eval accuracy against training wall time, one colour per method; ``curves`` maps a
    method to the eval rows of each of its runs (seeds). With several seeds the mean curve
    is drawn bold over the individual seeds."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method, runs in curves.items():
        color = COLORS.get(method)
        for i, rows in enumerate(runs):
            xs = [r["wall_time_s"] / 60 for r in rows]
            ys = [r["eval_accuracy"] for r in rows]
            ax.plot(xs, ys, color=color, lw=1.6 if len(runs) == 1 else 0.8,
                    alpha=1.0 if len(runs) == 1 else 0.45, marker="o", ms=2.5,
                    label=method if (len(runs) == 1 and i == 0) else None)
        if len(runs) > 1:
            mean = mean_curve(runs)
            ax.plot([m[0] / 60 for m in mean], [m[1] for m in mean], color=color, lw=2.2,
                    label=f"{method} (mean of {len(runs)} seeds)")
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=0.8, label=reference_label or None)
    ax.set_xlabel("training wall time (minutes)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    # outside the axes: inside, it hid the late part of curves that end low
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title("\n".join(textwrap.fill(part, 95) for part in title.split("\n")),
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_curve(runs: Sequence[Sequence[dict]], points: int = 40):
    """Mean accuracy over runs on a common time grid (each run's accuracy is held constant
    between its evaluations, i.e. the latest evaluation so far)."""
    end = min(rows[-1]["wall_time_s"] for rows in runs)
    grid = [end * i / (points - 1) for i in range(points)]
    out = []
    for t in grid:
        vals = []
        for rows in runs:
            latest = rows[0]["eval_accuracy"]
            for r in rows:
                if r["wall_time_s"] <= t + 1e-9:
                    latest = r["eval_accuracy"]
            vals.append(latest)
        out.append((t, sum(vals) / len(vals)))
    return out


def plot_bench(rows: Sequence[dict], path, title: str = "") -> Path:
    """Step time split into forward and the rest (stacked bars), per model and method;
    ``rows`` are the benchmark's step rows (model, method, forward_s, other_s)."""
    path = Path(path)
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(model_names), figsize=(4.2 * len(model_names), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], model_names):
        sub = [r for r in rows if r["model"] == model]
        names = [r["method"] for r in sub]
        fwd = [r["forward_s"] * 1e3 for r in sub]
        other = [r["other_s"] * 1e3 for r in sub]
        xs = range(len(sub))
        ax.bar(xs, fwd, color="tab:gray", label="forward passes")
        ax.bar(xs, other, bottom=fwd, color="tab:orange", label="everything else")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per step (median)")
        ax.set_title(model, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(rows: Sequence[dict], path, title: str = "") -> Path:
    """Peak memory above the loaded model per method (bars), per model."""
    path = Path(path)
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(model_names), figsize=(4.2 * len(model_names), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], model_names):
        sub = [r for r in rows if r["model"] == model]
        ax.bar(range(len(sub)), [r["extra_peak_bytes"] / 2**20 for r in sub],
               color=[COLORS.get(r["method"], "tab:orange") for r in sub])
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels([r["method"] for r in sub], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("peak memory above loaded model (MiB)")
        ax.set_title(f"{model} (weights {sub[0]['model_bytes'] / 2**20:.0f} MiB)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
