"""Kernel benchmark: fused perturb and restore+update against a plain copy and MeZO's way.

For every size, storage dtype, backend and noise distribution it times
  * ``perturb``: p <- p + eps*z in place (zofo_kernels.perturb_);
  * ``update``:  the fused restore + ZO-SGD update (zofo_kernels.zo_update_, q = 1);
and in the same run the two anchors on a tensor of the same dtype and size:
  * ``copy``: dst.copy_(src), which reads and writes the same bytes: the bandwidth ceiling;
  * ``mezo``: p.add_(torch.normal(0, 1, size=p.shape), alpha=eps), how MeZO perturbs.
Effective bandwidth counts the weight bytes read plus written (2 * numel * element size).
All candidates of one (size, dtype) are timed round-robin (one run of each in turn) after a
warm-up, and the median of the repetitions is reported, so load from other processes hits
all of them alike; on GPU each run is bracketed by torch.cuda.synchronize().

    python benchmarks/bench_kernels.py --quick          # small sizes, a minute on 2 cores
    python benchmarks/bench_kernels.py                  # up to 1e8 elements (CPU)
    python benchmarks/bench_kernels.py --device cuda    # on a GPU (cuda and triton backends)
    python benchmarks/bench_kernels.py --dispatch-vs-native --quick
                                  # the dispatched CPU build against a -march=native build
    python benchmarks/bench_kernels.py --output benchmarks/results
                                  # the committed kernels_cpu.csv (from the top of the checkout)

Writes CSV rows (op, backend, dtype, distribution, numel, metric, value, device_name, date) to
<output>/kernels_<device>.csv, ``--output`` being ./zofo-bench-results/ (under the current
folder, never the checkout's committed results) unless given, or to the file ``--out`` names,
and prints a table of ratios (op / copy, op / MeZO).

``--dispatch-vs-native`` times, round-robin in one process, the CPU variant the package chose
at load (the portable wheel's path) and a ``-march=native`` build of the same sources (the
package's ``_C_native`` if it was built with ZOFO_CPU_VARIANTS=auto,native, else compiled with
CMake into a temporary folder), checks that both give the same bits, and prints the speed
ratio native time / dispatched time per case and their geometric mean (1.0: as fast).
CSV: <output>/kernels_cpu_dispatch.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

# Idle OpenMP threads sleep instead of spinning (set before torch loads its runtime): torch's
# runtime and the one of the native module are distinct, and on a small or shared machine
# spinning threads of one make the other wait for a scheduler time slice (~10 ms) per call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import zofo_kernels as zk  # noqa: E402
from zofo_kernels.core.backends import base as backend_registry  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-3
LR = 1e-6
REFERENCE_MAX_NUMEL = 1_000_000  # the numpy reference is slow; time it on small sizes only
FIELDS = ["op", "backend", "dtype", "distribution", "numel", "metric", "value", "device_name",
          "date"]
# where the CSV goes unless --output/--out say otherwise: relative to the current folder, as
# zofo-bench's ./zofo-bench-results/, so a run never overwrites the checkout's committed CSVs
DEFAULT_OUTPUT = "zofo-bench-results"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return f"{name} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: Dict[str, Callable[[], None]], device: torch.device, warmup: int,
                     repeats: int) -> Dict[str, float]:
    """Median seconds of each function, run in turn so that background load is shared."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def backends_for(device: torch.device, wanted: List[str]) -> List[str]:
    out = []
    for name, st in zk.available_backends().items():
        if wanted and name not in wanted:
            continue
        if not st.available:
            print(f"# backend {name}: unavailable ({st.reason})")
            continue
        if device.type == "cpu" and name == "triton":
            continue  # the Triton interpreter on CPU is a test vehicle, not a fast path
        if backend_registry.get(name).supports_device(device):
            out.append(name)
    return out


def run(args) -> List[dict]:
    device = torch.device(args.device)
    dev_name = device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    backends = backends_for(device, args.backends)
    print(f"# device: {dev_name}; backends: {backends}; sizes: {args.sizes}")
    rows: List[dict] = []

    def add(op, backend, dtype, dist, numel, metric, value):
        rows.append(dict(op=op, backend=backend, dtype=dtype, distribution=dist, numel=numel,
                         metric=metric, value=f"{value:.6g}", device_name=dev_name, date=date))

    table: List[Tuple] = []
    for numel in args.sizes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            gen = torch.Generator(device="cpu").manual_seed(numel)
            p = (torch.randn(numel, generator=gen) * 0.02).to(dtype).to(device)
            src = p.clone()
            dst = torch.empty_like(p)
            grads = torch.tensor([0.5], dtype=torch.float32, device=device)
            nbytes = 2 * numel * p.element_size()
            fns: Dict[str, Callable[[], None]] = {
                "copy|torch|-": lambda: dst.copy_(src),
                "mezo|torch|gaussian": lambda: p.add_(
                    torch.normal(0.0, 1.0, size=p.shape, dtype=dtype, device=device), alpha=EPS),
            }
            for backend in backends:
                if backend == "reference" and numel > REFERENCE_MAX_NUMEL:
                    continue
                for dist in args.dists:
                    fns[f"perturb|{backend}|{dist}"] = (
                        lambda b=backend, d=dist: zk.perturb_(p, 1234, EPS, d, 0, backend=b))
                    fns[f"update|{backend}|{dist}"] = (
                        lambda b=backend, d=dist: zk.zo_update_(
                            p, 1234, lr=LR, projected_grads=grads, restore_scale=-EPS,
                            restore_direction=0, distribution=d, backend=b))
            repeats = args.repeats if numel >= 10 ** 7 or args.quick else max(args.repeats, 9)
            secs = time_round_robin(fns, device, args.warmup, repeats)
            t_copy = secs["copy|torch|-"]
            t_mezo = secs["mezo|torch|gaussian"]
            for key, t in secs.items():
                op, backend, dist = key.split("|")
                add(op, backend, dname, dist, numel, "time_ms", 1e3 * t)
                add(op, backend, dname, dist, numel, "gbps", nbytes / t / 1e9)
                if op not in ("copy", "mezo"):
                    add(op, backend, dname, dist, numel, "ratio_copy", t_copy / t)
                    add(op, backend, dname, dist, numel, "ratio_mezo", t_mezo / t)
                table.append((numel, dname, op, backend, dist, 1e3 * t, nbytes / t / 1e9,
                              t_copy / t, t_mezo / t))
            del p, src, dst
    print_table(table)
    return rows


def native_module(build_dir: str):
    """The -march=native CPU module: the package's own if built, else compiled here."""
    from zofo_kernels.core.backends.native import loader as _native
    if "native" in _native.built_cpu_variants():
        mod, err = _native.cpu_module("native")
        if mod is None:
            raise SystemExit(f"_C_native is installed but does not load: {err}")
        return mod
    import pybind11
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_pkg
            cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
        except ImportError:
            raise SystemExit("--dispatch-vs-native needs cmake (pip install cmake)")
    out_dir = os.path.join(build_dir, "out")
    cfg = [cmake, "-S", os.path.dirname(HERE), "-B", os.path.join(build_dir, "build"),
           "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DZOFO_CPU_VARIANTS=native",
           "-DZOFO_BUILD_CUDA=OFF", f"-DZOFO_OUTPUT_DIR={out_dir}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    print(f"# compiling the -march=native module in {build_dir} ...", flush=True)
    t0 = time.perf_counter()
    for cmd in (cfg, [cmake, "--build", os.path.join(build_dir, "build"), "--target",
                      "_C_native", "-j", str(os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"building _C_native failed:\n{proc.stdout[-3000:]}"
                             f"{proc.stderr[-3000:]}")
    print(f"# compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    path = next(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                if f.startswith("_C_native"))
    spec = importlib.util.spec_from_file_location("zofo_kernels._C_native", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_dispatch_vs_native(args) -> List[dict]:
    """The dispatched CPU build against a -march=native build, timed round-robin."""
    from zofo_kernels.core.backends.base import get
    from zofo_kernels.core.backends.native.cpu import CpuBackend

    dispatched = get("cpu")
    if not dispatched.status().available:
        raise SystemExit(f"the cpu backend is unavailable: {dispatched.status().reason}")
    with tempfile.TemporaryDirectory(prefix="zofo-native-") as tmp:
        native = CpuBackend(module=native_module(args.native_build_dir or tmp))
        dev_name = cpu_name()
        print(f"# {dev_name}")
        print(f"# dispatched: {dispatched.status().reason}")
        print(f"# native:     {native._mod.compile_flags}")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        label = f"cpu-{dispatched.variant}"
        rows, table = [], []
        for numel in args.sizes:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                gen = torch.Generator().manual_seed(numel)
                p0 = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
                grads = torch.tensor([0.5], dtype=torch.float32)
                ps = {"d": p0.clone(), "n": p0.clone()}
                fns: Dict[str, Callable[[], None]] = {}
                for dist in args.dists:
                    for tag, be in (("d", dispatched), ("n", native)):
                        p = ps[tag]
                        fns[f"perturb|{tag}|{dist}"] = (
                            lambda be=be, p=p, d=dist: be.perturb([p], [0], 1234, d, EPS, 0,
                                                                  0.0, 0))
                        fns[f"update|{tag}|{dist}"] = (
                            lambda be=be, p=p, d=dist: be.update(
                                [p], [0], 1234, d, lr=LR, projected_grads=grads,
                                restore_scale=-EPS, restore_direction=0, weight_decay=0.0,
                                stochastic_rounding=False))
                repeats = args.repeats if numel >= 10 ** 7 or args.quick else max(args.repeats, 9)
                secs = time_round_robin(fns, torch.device("cpu"), args.warmup, repeats)
                if not torch.equal(ps["d"], ps["n"]):
                    raise SystemExit(f"dispatched and native builds disagree ({numel}, {dname})")
                nbytes = 2 * numel * p0.element_size()
                for key, t in secs.items():
                    op, tag, dist = key.split("|")
                    rows.append(dict(op=op, backend=label if tag == "d" else "cpu-native",
                                     dtype=dname, distribution=dist, numel=numel,
                                     metric="gbps", value=f"{nbytes / t / 1e9:.6g}",
                                     device_name=dev_name, date=date))
                    if tag == "d":
                        tn = secs[f"{op}|n|{dist}"]
                        table.append((numel, dname, op, dist, 1e3 * t, 1e3 * tn, tn / t))
    head = (f"{'numel':>11} {'dtype':5} {'op':8} {'dist':10} {label + ' ms':>12} "
            f"{'native ms':>10} {'native/dispatched':>18}")
    print(head)
    print("-" * len(head))
    for numel, dname, op, dist, td, tn, r in table:
        print(f"{numel:>11} {dname:5} {op:8} {dist:10} {td:12.3f} {tn:10.3f} {r:18.3f}")
    gm = math.exp(statistics.fmean(math.log(r[-1]) for r in table))
    print(f"# speed of the dispatched build ({dispatched.variant}) relative to -march=native: "
          f"geometric mean {gm:.3f} over {len(table)} cases, range "
          f"{min(r[-1] for r in table):.3f} .. {max(r[-1] for r in table):.3f} "
          f"(1.0 = as fast; > 1 = faster); results bit-identical")
    return rows


def print_table(table) -> None:
    head = f"{'numel':>11} {'dtype':5} {'op':8} {'backend':9} {'dist':10} {'ms':>9} {'GB/s':>7} " \
           f"{'/copy':>6} {'/mezo':>6}"
    print(head)
    print("-" * len(head))
    for numel, dname, op, backend, dist, ms, gbps, rc, rm in table:
        print(f"{numel:>11} {dname:5} {op:8} {backend:9} {dist:10} {ms:9.3f} {gbps:7.2f} "
              f"{rc:6.2f} {rm:6.2f}")


def write_csv(rows: List[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"# wrote {len(rows)} rows to {path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: cuda when available, cpu for --dispatch-vs-native)")
    ap.add_argument("--quick", action="store_true", help="small sizes only (1e4 .. 1e6)")
    ap.add_argument("--sizes", type=float, nargs="+", help="element counts (default by device)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--dists", nargs="+", default=["rademacher", "gaussian"],
                    choices=["rademacher", "gaussian"])
    ap.add_argument("--backends", nargs="+", default=[],
                    help="backends to time (default: every available one for the device)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--output", default=DEFAULT_OUTPUT,
                    help="folder for kernels_<device>.csv (default: ./%(default)s, under the "
                         "current folder; the committed results: --output benchmarks/results)")
    ap.add_argument("--out", help="CSV file path (overrides --output)")
    ap.add_argument("--dispatch-vs-native", action="store_true",
                    help="CPU: time the variant chosen at load against a -march=native build")
    ap.add_argument("--native-build-dir", default=None,
                    help="where --dispatch-vs-native compiles the native module (default: a "
                         "temporary folder)")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = ("cuda" if torch.cuda.is_available() and not args.dispatch_vs_native
                       else "cpu")
    if args.dispatch_vs_native and args.device != "cpu":
        ap.error("--dispatch-vs-native compares CPU builds: use it with --device cpu")
    if args.sizes is None:
        if args.quick:
            args.sizes = [1e4, 1e5, 1e6]
        elif args.device.startswith("cuda"):
            args.sizes = [1e5, 1e6, 1e7, 1e8, 5e8]
        else:
            args.sizes = [1e4, 1e5, 1e6, 1e7, 1e8]
    args.sizes = [int(s) for s in args.sizes]
    if any(s <= 0 for s in args.sizes):
        ap.error("sizes must be positive")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.out is None:
        dev = torch.device(args.device)
        tag = "cpu" if dev.type == "cpu" else f"cuda_{slug(torch.cuda.get_device_name(dev))}"
        if args.dispatch_vs_native:
            tag = "cpu_dispatch"
        args.out = os.path.join(args.output, f"kernels_{tag}.csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run_dispatch_vs_native(args) if args.dispatch_vs_native else run(args)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
