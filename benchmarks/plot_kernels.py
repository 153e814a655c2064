"""Plot the kernel benchmark CSV (benchmarks/bench_kernels.py) as one PNG.

One panel per (storage dtype, op): effective bandwidth (GB/s, weight bytes read + written)
against the number of elements, one line per (backend, distribution), with the copy ceiling
and MeZO's normal+add as dashed anchors.

    python benchmarks/plot_kernels.py benchmarks/results/kernels_cpu.csv \
        -o benchmarks/results/kernels_cpu.png
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zofo_kernels.apps.plotting import method_colors  # noqa: E402

COPY_COLOR, MEZO_COLOR = "black", "tab:red"

YLABELS = {"gbps": "GB/s (weights read + written)", "time_ms": "ms per call",
           "ratio_copy": "speed / plain copy", "ratio_mezo": "speed / MeZO normal+add"}
REQUIRED = {"op", "backend", "dtype", "distribution", "numel", "metric", "value", "device_name"}


def load(paths):
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = REQUIRED - set(reader.fieldnames or [])
            if missing:
                raise SystemExit(f"{path}: missing columns {sorted(missing)}")
            rows.extend(reader)
    if not rows:
        raise SystemExit("no rows in " + ", ".join(paths))
    return rows


def plot(rows, out_path, metric="gbps"):
    series = defaultdict(list)  # (dtype, op, backend, dist) -> [(numel, value)]
    dtypes, ops = [], []
    for r in rows:
        if r["metric"] != metric:
            continue
        key = (r["dtype"], r["op"], r["backend"], r["distribution"])
        series[key].append((int(r["numel"]), float(r["value"])))
        if r["dtype"] not in dtypes:
            dtypes.append(r["dtype"])
        if r["op"] not in ("copy", "mezo") and r["op"] not in ops:
            ops.append(r["op"])
    if not series:
        raise SystemExit(f"no rows with metric {metric!r}")
    fig, axes = plt.subplots(len(dtypes), len(ops), figsize=(6 * len(ops), 4 * len(dtypes)),
                             squeeze=False, sharex=True)
    # one colour per (backend, distribution) series, the same in every panel, none equal to
    # the anchors' colours
    colors = method_colors(sorted({f"{b} {d}" for (_, o, b, d) in series
                                   if o not in ("copy", "mezo")}),
                           avoid=(COPY_COLOR, MEZO_COLOR))
    for i, dt in enumerate(dtypes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for (d, o, backend, dist), pts in sorted(series.items()):
                if d != dt:
                    continue
                pts = sorted(pts)
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if o == op:
                    name = f"{backend} {dist}"
                    ax.plot(xs, ys, marker="o", color=colors[name], label=name)
                elif o == "copy":
                    ax.plot(xs, ys, "--", color=COPY_COLOR, label="copy (ceiling)")
                elif o == "mezo":
                    ax.plot(xs, ys, ":", color=MEZO_COLOR, label="MeZO normal+add")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op}, {dt}")
            ax.set_xlabel("elements")
            ax.set_ylabel(YLABELS[metric])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    device = rows[0]["device_name"]
    date = rows[0].get("date", "")
    fig.suptitle(f"zofo_kernels kernels on {device} {date}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    print(f"wrote {out_path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="CSV file(s) written by bench_kernels.py")
    ap.add_argument("-o", "--out", help="PNG path (default: first CSV with .png)")
    ap.add_argument("--metric", default="gbps", choices=["gbps", "time_ms", "ratio_copy",
                                                         "ratio_mezo"])
    args = ap.parse_args(argv)
    out = args.out or os.path.splitext(args.csv[0])[0] + ".png"
    plot(load(args.csv), out, args.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
