"""PNG figures for training runs, the SST-2 study and the benchmarks (matplotlib, Agg)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One colour per method, distinct across all methods of every figure (training runs, the
# study, zofo-bench's step and memory plots), so a method looks the same everywhere.
COLORS = {"mezo": "tab:blue", "bilevel-zofo-adam": "tab:orange", "fo-lora": "tab:green",
          "bilevel-zofo": "tab:red", "fo-full": "tab:purple", "mezo-rademacher": "tab:brown",
          "mezo-ref": "tab:pink", "forward": "tab:gray", "inference": "tab:olive",
          "mezo-lora": "tab:cyan"}
# For names not in COLORS (further methods, kernel-benchmark series): unused colours first.
_EXTRA = ("#1a1a80", "#e6ab02", "#66a61e", "#a6761d", "#7570b3", "#e7298a", "#1b9e77",
          "#d95f02", "#4d4d4d", "#b15928", "#6a3d9a", "#33a02c", "#fb9a99", "#fdbf6f")


def method_colors(names: Sequence[str], avoid: Sequence[str] = ()) -> Dict[str, str]:
    """A distinct colour for each name of one figure: the fixed colour of a known method,
    else the next colour that no other name (nor ``avoid``) uses."""
    out: Dict[str, str] = {}
    used = set(avoid)
    for n in dict.fromkeys(names):
        if n in COLORS and COLORS[n] not in used:
            out[n] = COLORS[n]
            used.add(out[n])
    pool = [c for c in list(COLORS.values()) + list(_EXTRA) if c not in used]
    for n in dict.fromkeys(names):
        if n not in out:
            if not pool:
                raise ValueError(f"more than {len(out)} series in one figure")
            out[n] = pool.pop(0)
            used.add(out[n])
    return out


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
    return _save(fig, path, title)


def plot_study(curves: Dict[str, List[Sequence[dict]]], path, title: str = "",
               reference: Optional[float] = None, reference_label: str = "") -> Path:
    """Eval accuracy against training wall time, one colour per method; ``curves`` maps a
    method to the eval rows of each of its runs (seeds). With several seeds the mean curve
    is drawn bold over the individual seeds."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = method_colors(list(curves))
    for method, runs in curves.items():
        color = colors[method]
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
    return _save(fig, path, dpi=120)


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


def _per_model(rows: Sequence[dict]):
    """One subplot per model: (the figure, [(axis, model, the model's rows)])."""
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(model_names), figsize=(4.2 * len(model_names), 3.8),
                             squeeze=False)
    return fig, [(ax, model, [r for r in rows if r["model"] == model])
                 for ax, model in zip(axes[0], model_names)]


def _label_methods(ax, names: Sequence[str], ylabel: str, title: str) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path, title: str = "", dpi: int = 110) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_bench(rows: Sequence[dict], path, title: str = "") -> Path:
    """Step time split into forward and the rest (stacked bars), per model and method;
    ``rows`` are the benchmark's step rows (model, method, forward_s, other_s)."""
    fig, panels = _per_model(rows)
    for ax, model, sub in panels:
        names = [r["method"] for r in sub]
        fwd = [r["forward_s"] * 1e3 for r in sub]
        other = [r["other_s"] * 1e3 for r in sub]
        colors = [method_colors(names)[n] for n in names]
        # one colour per method; the forward part of its bar light and hatched
        ax.bar(range(len(sub)), fwd, color=colors, alpha=0.45, hatch="//", edgecolor=colors)
        ax.bar(range(len(sub)), other, bottom=fwd, color=colors, edgecolor=colors)
        _label_methods(ax, names, "ms per step (median)", model)
    from matplotlib.patches import Patch
    panels[0][0].legend(handles=[Patch(facecolor="0.6", alpha=0.45, hatch="//",
                                       edgecolor="0.4", label="forward passes"),
                                 Patch(facecolor="0.4", label="everything else")], fontsize=8)
    return _save(fig, path, title)


def plot_memory(rows: Sequence[dict], path, title: str = "") -> Path:
    """Peak memory above the loaded model per method (bars), per model."""
    fig, panels = _per_model(rows)
    for ax, model, sub in panels:
        names = [r["method"] for r in sub]
        ax.bar(range(len(sub)), [r["extra_peak_bytes"] / 2**20 for r in sub],
               color=[method_colors(names)[n] for n in names])
        _label_methods(ax, names, "peak memory above loaded model (MiB)",
                       f"{model} (weights {sub[0]['model_bytes'] / 2**20:.0f} MiB)")
    return _save(fig, path, title)
