"""zofo-bench: step time and peak memory of ZO, MeZO-reference, FO and Bilevel-ZOFO steps.

Step time: every method runs on the same model shape and the same fixed batch, round-robin
(one step of each method in turn, ``--repeats`` rounds after ``--warmup`` rounds), so that
load from other processes hits all methods alike; each step is split into the time spent
in forward passes (the loss closure) and everything else (noise, updates, backward, Adam).

Memory: each method runs in its own subprocess: load the model, build the batch and the
optimizer, then measure the peak during ``--memory-steps`` steps above the memory held
right before the first step (CPU: peak RSS, reset through /proc/self/clear_refs; GPU:
``torch.cuda.max_memory_allocated``). The inference row is a forward pass under no_grad.

``zofo-bench --quick`` runs MiniLM-L6's shape with random weights on a synthetic batch
(no data, no download) in a few minutes on two CPU cores, on every row but the estimator
variants (ESTIMATOR_ROWS: sparse, low-rank, FZOO), which ``--methods`` names. Everything it runs is inside the
package (the MeZO baseline is :mod:`zofo_kernels.apps.mezo_reference`), so an installed copy
works from any folder; it writes into ``--output`` (default ``./zofo-bench-results`` under
the current folder) and ends by naming the absolute output folder and the files written.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from zofo_kernels.apps import data as data_mod
from zofo_kernels.apps import measure
from zofo_kernels.integrations import methods as methods_mod
from zofo_kernels.apps import models as models_mod
from zofo_kernels.apps.measure import CountedLoss

SPARSE_FRACTION = 0.2  # Sparse-MeZO's setting: the 20% smallest weights of each tensor
LOWRANK = 2  # LOZO's rank (its default), V redrawn every LOWRANK_PERIOD steps
LOWRANK_PERIOD = 50
FZOO_DIRECTIONS = 4  # the estimator screening's FZOO row: 4 one-sided directions, 5 forwards

# A benchmark row: a method of the registry (zofo_kernels/integrations/methods.py) with fixed
# settings, a forward pass, or the MeZO reference implementation (the baseline the kernels
# replace).
ROWS = {
    "forward": (None, {}),
    "mezo": ("mezo", {}),
    "mezo-rademacher": ("mezo", dict(distribution="rademacher")),
    "mezo-sparse": ("mezo", dict(distribution="rademacher", sparse_fraction=SPARSE_FRACTION)),
    "mezo-lowrank": ("mezo", dict(distribution="rademacher", lowrank=LOWRANK,
                                  lowrank_period=LOWRANK_PERIOD)),
    "mezo-fzoo": ("mezo", dict(distribution="rademacher", estimator="forward",
                               n_directions=FZOO_DIRECTIONS, normalize="std")),
    "mezo-ref": (None, {}),
    "fo-full": ("fo-full", {}),
    "fo-lora": ("fo-lora", {}),
    "bilevel-zofo": ("bilevel-zofo", dict(theta_update="rms")),
    "bilevel-zofo-adam": ("bilevel-zofo", dict(theta_update="adam")),
}
METHODS = tuple(ROWS)
# the estimator variants of the MeZO step: measured when named (--methods) or without --quick
ESTIMATOR_ROWS = ("mezo-sparse", "mezo-lowrank", "mezo-fzoo")
MEMORY_METHODS = ("inference", "mezo", "mezo-sparse", "mezo-lowrank", "mezo-fzoo", "mezo-ref",
                  "fo-full", "fo-lora", "bilevel-zofo", "bilevel-zofo-adam")
DESCRIPTIONS = {
    "forward": "one forward pass (no_grad)",
    "inference": "forward pass under no_grad",
    "mezo": "MeZO step on the fused kernels (ZOOptimizer, central, q=1, Gaussian)",
    "mezo-rademacher": "MeZO step on the fused kernels (central, q=1, Rademacher)",
    "mezo-sparse": f"MeZO step, sparse perturbation: the {SPARSE_FRACTION:.0%} smallest weights "
                   "of each tensor (Rademacher; mask bitmap built per step)",
    "mezo-lowrank": f"MeZO step, low-rank directions: rank {LOWRANK} U V^T per matrix, V "
                    f"redrawn every {LOWRANK_PERIOD} steps (Rademacher; factors per step)",
    "mezo-fzoo": f"FZOO step: {FZOO_DIRECTIONS} one-sided Rademacher directions from one "
                 "unperturbed loss, the update over the spread of their slopes",
    "mezo-ref": "MeZO reference step (torch.normal per parameter, 4 sweeps)",
    "fo-full": "FO full fine-tuning step (Adam)",
    "fo-lora": "FO-LoRA step (Adam, r=8 on q/v)",
    "bilevel-zofo": "Bilevel-ZOFO outer step (LoRA r=8, inner_steps FO steps of S, "
                    "forward-difference ZO)",
    "bilevel-zofo-adam": "Bilevel-ZOFO outer step with the authors' update (theta.grad = g*z "
                         "materialised, AdamW on theta and P: three backbone-sized buffers)",
}
# the rows that step the fused kernels (their backend is reported): the zeroth-order ones
KERNEL_ROWS = tuple(row for row, (name, _) in ROWS.items()
                    if name is not None and methods_mod.get(name).zeroth_order)
# Targets of the project, checked on the printed ratios.
TARGET_STEP_OVER_2FWD = 1.10
TARGET_SPEEDUP_VS_MEZO = 1.9
TARGET_ZO_EXTRA_PCT = 1.0
# A sparse step keeps one bit per weight during the step: 1/32 of float32 weights (3.125%).
TARGET_SPARSE_EXTRA_PCT = 100.0 / 32 + TARGET_ZO_EXTRA_PCT
TARGET_BILEVEL_OVER_FOLORA = 1.1
# Every row's optimizer takes steps this small, so the weights barely move while timed.
BENCH_LR = 1e-7


def load_mezo_reference():
    """The MeZO reference step class (:class:`zofo_kernels.apps.mezo_reference.MeZOReference`)."""
    from zofo_kernels.apps.mezo_reference import MeZOReference
    return MeZOReference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One row's step on a fixed batch; ``forward`` is a :class:`CountedLoss` (GPU-synced)."""

    def __init__(self, row: str, model: torch.nn.Module, batch: dict, device,
                 backend: Optional[str], inner_steps: int):
        if row not in ROWS and row != "inference":
            raise ValueError(f"unknown method {row!r}; expected one of {METHODS}")
        self.method = row
        self.device = device
        self.forward = CountedLoss(models_mod.classification_loss, sync=device)
        self.batch = batch
        self.model = model
        self.backward_calls = 0
        name, fixed = ROWS.get(row, (None, {}))
        if name is None:
            self._step = self._inference if row in ("forward", "inference") else self._mezo_ref
            if row == "mezo-ref":
                self.opt = load_mezo_reference()(model.named_parameters(), lr=BENCH_LR,
                                                 eps=1e-3, seed=0)
            self.model.eval()
            return
        method = methods_mod.get(name)
        if method.peft:
            self.model = models_mod.add_peft(model, "lora")
        settings = dict(fixed, lr=BENCH_LR)
        if method.zeroth_order:
            settings.update(eps=1e-3, seed=0, backend=backend)
        if name == "bilevel-zofo":
            # the upper step's B_g is a fresh lower batch in the protocol: same shape here
            settings.update(lam=10.0, inner_steps=inner_steps, peft_lr=BENCH_LR)
            self.lowers = [batch] * inner_steps
            self._step = lambda: self.opt.step(self.batch, self.lowers, self.batch)
        elif method.zeroth_order:
            self._step = lambda: self.opt.step(lambda: self.forward(self.model, self.batch))
        else:
            self._step = self._fo
        peft_model = self.model
        self.opt = method.build(peft_model, method.resolve(**settings),
                                loss_fn=lambda b: self.forward(peft_model, b))
        self.model.eval()

    def _inference(self):
        with torch.no_grad():
            return self.forward(self.model, self.batch)

    def _mezo_ref(self):
        return self.opt.step(lambda: self.forward(self.model, self.batch))

    def _fo(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward(self.model, self.batch)
        loss.backward()
        self.backward_calls += 1
        self.opt.step()
        return loss

    def backward_count(self) -> int:
        if self.method.startswith("bilevel-zofo"):
            return int(self.opt.backward_count)  # the inner and upper steps' backwards
        return self.backward_calls

    def step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self._step()
        _sync(self.device)
        return time.perf_counter() - t0


def _batch(loaded: models_mod.Loaded, args, device) -> dict:
    vocab = loaded.model.config.vocab_size
    pad = loaded.model.config.pad_token_id
    b = data_mod.random_batch(min(vocab, 30522), args.batch_size, args.seq_len, seed=0,
                              pad_token_id=pad)
    return {k: v.to(device) for k, v in b.items()}


def _model(name: str, args, device) -> models_mod.Loaded:
    # a new classification head: the shapes every benchmark result so far was measured on
    return models_mod.load_model(name, dtype=args.dtype, seed=0, with_tokenizer=False,
                                 device=str(device), head="random")


def _pct(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


# --------------------------------------------------------------------------- step times

# rows that are forward passes + sweeps (the ZO steps on the kernels)
OWN_FWD_ROWS = ("mezo", "mezo-rademacher", "mezo-sparse", "mezo-lowrank", "mezo-fzoo")


def time_steps(name: str, args, device) -> List[dict]:
    from tqdm import tqdm
    loaded = _model(name, args, device)
    base = loaded.model
    batch = _batch(loaded, args, device)
    benches: Dict[str, Bench] = {}
    skipped = {}
    for method in args.methods:
        # PEFT methods wrap the modules in place, so they get their own copy.
        model = copy.deepcopy(base) if _needs_peft(method) else base
        try:
            benches[method] = Bench(method, model, batch, device, args.backend, args.inner_steps)
        except (ImportError, AttributeError, FileNotFoundError) as exc:
            skipped[method] = str(exc)
            print(f"  skipping {method}: {exc}", file=sys.stderr)
    times = {m: [] for m in benches}
    fwd = {m: [] for m in benches}
    counts = {m: [0, 0] for m in benches}
    rounds = args.warmup + args.repeats
    with tqdm(total=rounds * len(benches), desc=f"steps {name}", disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for r in range(rounds):
            for m, b in benches.items():
                f0, c0, k0 = b.forward.seconds, b.forward.calls, b.backward_count()
                dt = b.step()
                if r >= args.warmup:
                    times[m].append(dt)
                    fwd[m].append(b.forward.seconds - f0)
                    counts[m] = [b.forward.calls - c0, b.backward_count() - k0]
                bar.update(1)
    rows = []
    fwd_only = statistics.median(times["forward"]) if "forward" in times else None
    ref = statistics.median(times["mezo-ref"]) if "mezo-ref" in times else None
    for m in benches:
        step = statistics.median(times[m])
        f = statistics.median(fwd[m])
        other = statistics.median([t - x for t, x in zip(times[m], fwd[m])])
        rows.append(dict(
            model=name, method=m, description=DESCRIPTIONS[m], device=str(device),
            dtype=args.dtype, threads=torch.get_num_threads(), batch_size=args.batch_size,
            seq_len=args.seq_len, parameters=loaded.num_parameters,
            step_s=round(step, 6), step_s_p20=round(_pct(times[m], 0.2), 6),
            step_s_p80=round(_pct(times[m], 0.8), 6), forward_s=round(f, 6),
            other_s=round(other, 6), forwards_per_step=counts[m][0],
            backwards_per_step=counts[m][1], repeats=len(times[m]),
            step_over_2fwd=round(step / (2 * fwd_only), 4) if fwd_only and m != "forward"
            else None,
            # the step against its own forward passes (same moment, same load)
            step_over_own_fwd=round(step / f, 4) if m in OWN_FWD_ROWS else None,
            mezo_ref_over_step=round(ref / step, 4) if ref and m not in ("forward", "mezo-ref")
            else None,
            backend=_backend_name(device, args.backend) if m in KERNEL_ROWS else "",
        ))
    return rows


def _needs_peft(row: str) -> bool:
    """PEFT rows wrap the modules in place, so they get their own copy of the model."""
    name = ROWS.get(row, (None, {}))[0]
    return name is not None and methods_mod.get(name).peft


def _backend_name(device, requested) -> str:
    from zofo_kernels.core.backends import base
    return base.select(device, requested, os.environ.get("ZOFO_BACKEND")).name


# --------------------------------------------------------------------------- memory

# glibc's dynamic mmap threshold lets freed large blocks linger in the heap, so RSS would
# depend on allocation history; a fixed threshold returns every large tensor to the system
# when it is freed, and RSS then follows live memory closely.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
              "MALLOC_ARENA_MAX": "2"}


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: the peak memory of ``spec['method']`` above the loaded state."""
    ns = argparse.Namespace(**spec)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    loaded = _model(ns.model, ns, device)
    batch = _batch(loaded, ns, device)
    model_bytes = loaded.parameter_bytes
    b = Bench(ns.method, loaded.model, batch, device, ns.backend, ns.inner_steps)
    # Library initialisation is not a step's memory: every method first runs one forward
    # pass under no_grad (thread pools, kernel caches), one kernel call on a small dummy
    # tensor (loads the native module) and the sparse step's mask making on dummies, then
    # the peak is reset.
    with torch.no_grad():
        models_mod.classification_loss(b.model, batch)
    from zofo_kernels.core import ops
    from zofo_kernels.core.optim import sparse
    ops.perturb_(torch.zeros(4096, device=device), 0, 0.0, backend=ns.backend)
    # the sparse step's torch ops (gather, kthvalue, bincount) keep ~3 MB of their own
    # once first used in a process: initialisation too, not the step's memory
    dummies = [torch.zeros(2 * sparse.SAMPLE + 1, device=device), torch.zeros(64, device=device)]
    sparse.set_bits(ops.magnitude_mask(dummies, sparse.thresholds(dummies, 0.5, {}),
                                       backend=ns.backend)[0])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = measure.rss_bytes()
        measure.reset_peak_rss()
    for _ in range(ns.memory_steps):
        b.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda max_memory_allocated"
    else:
        peak = measure.peak_rss_bytes()
        kind = "peak RSS"
    return dict(model=ns.model, method=ns.method, device=str(device), dtype=ns.dtype,
                model_bytes=model_bytes, baseline_bytes=base, peak_bytes=peak,
                extra_peak_bytes=max(0, peak - base), kind=kind, steps=ns.memory_steps,
                batch_size=ns.batch_size, seq_len=ns.seq_len)


def _worker_env() -> Dict[str, str]:
    """The environment of a memory subprocess: the allocator settings, and this very copy of
    the package first on the import path (whatever the current folder holds)."""
    env = dict(os.environ, **MALLOC_ENV)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    return env


def measure_memory(name: str, args) -> List[dict]:
    from tqdm import tqdm
    rows = []
    methods = [m for m in MEMORY_METHODS if m in args.methods or m == "inference"]
    for m in tqdm(methods, desc=f"memory {name}", disable=args.no_progress, dynamic_ncols=True):
        spec = dict(model=name, method=m, device=args.device, dtype=args.dtype,
                    backend=args.backend, inner_steps=args.inner_steps,
                    memory_steps=args.memory_steps, batch_size=args.batch_size,
                    seq_len=args.seq_len, threads=args.threads)
        proc = subprocess.run(
            [sys.executable, "-m", "zofo_kernels.apps.bench", "--memory-worker", json.dumps(spec)],
            capture_output=True, text=True, env=_worker_env())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"  memory run {name}/{m} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1]))
    inf = next((r for r in rows if r["method"] == "inference"), None)
    for r in rows:
        r["total_peak_bytes"] = r["model_bytes"] + r["extra_peak_bytes"]
        if inf is not None:
            over = r["extra_peak_bytes"] - inf["extra_peak_bytes"]
            r["extra_over_inference_bytes"] = over
            r["extra_over_inference_pct_of_model"] = round(100.0 * over / r["model_bytes"], 4)
    return rows


# --------------------------------------------------------------------------- report

def _write_csv(path: Path, rows: List[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def checks(step_rows: List[dict], mem_rows: List[dict]) -> List[dict]:
    """The project's targets, evaluated per model on the measured ratios."""
    out = []
    for model in dict.fromkeys([r["model"] for r in step_rows] + [r["model"] for r in mem_rows]):
        s = {r["method"]: r for r in step_rows if r["model"] == model}
        m = {r["method"]: r for r in mem_rows if r["model"] == model}
        for zo, label in (("mezo", "Gaussian"), ("mezo-rademacher", "Rademacher"),
                          ("mezo-sparse", "sparse, Rademacher"),
                          ("mezo-lowrank", f"low-rank r={LOWRANK}, Rademacher"),
                          ("mezo-fzoo", f"FZOO, {FZOO_DIRECTIONS} directions")):
            # the two-forward target holds for two-forward steps (FZOO takes q + 1 forwards)
            if zo in s and s[zo]["step_over_2fwd"] is not None and \
                    s[zo].get("forwards_per_step", 2) == 2:
                v = s[zo]["step_over_2fwd"]
                out.append(dict(model=model, check=f"ZO step ({label}) / two forward passes",
                                value=v, target=f"<= {TARGET_STEP_OVER_2FWD}",
                                passed=v <= TARGET_STEP_OVER_2FWD))
            if zo in s and s[zo].get("step_over_own_fwd") is not None:
                v = s[zo]["step_over_own_fwd"]
                out.append(dict(model=model,
                                check=f"ZO step ({label}) / its own forward passes",
                                value=v, target=f"<= {TARGET_STEP_OVER_2FWD}",
                                passed=v <= TARGET_STEP_OVER_2FWD))
            if zo in s and s[zo]["mezo_ref_over_step"] is not None:
                v = s[zo]["mezo_ref_over_step"]
                out.append(dict(model=model, check=f"MeZO reference step / ZO step ({label})",
                                value=v, target=f">= {TARGET_SPEEDUP_VS_MEZO}",
                                passed=v >= TARGET_SPEEDUP_VS_MEZO))
        for zo, label in (("mezo", "ZO"), ("mezo-lowrank", "low-rank ZO")):
            if zo in m and "extra_over_inference_pct_of_model" in m[zo]:
                v = m[zo]["extra_over_inference_pct_of_model"]
                out.append(dict(model=model, check=f"{label} extra peak over inference, % of "
                                "weights", value=v, target=f"< {TARGET_ZO_EXTRA_PCT}",
                                passed=v < TARGET_ZO_EXTRA_PCT))
        if "mezo-sparse" in m and "extra_over_inference_pct_of_model" in m["mezo-sparse"]:
            v = m["mezo-sparse"]["extra_over_inference_pct_of_model"]
            out.append(dict(model=model, check="sparse ZO extra peak over inference, % of "
                            "weights", value=v, target=f"< {TARGET_SPARSE_EXTRA_PCT:.3g}",
                            passed=v < TARGET_SPARSE_EXTRA_PCT))
        if "bilevel-zofo" in m and "fo-lora" in m:
            v = round(m["bilevel-zofo"]["total_peak_bytes"] / m["fo-lora"]["total_peak_bytes"], 4)
            out.append(dict(model=model, check="Bilevel-ZOFO / FO-LoRA peak (weights + extra)",
                            value=v, target=f"<= {TARGET_BILEVEL_OVER_FOLORA}",
                            passed=v <= TARGET_BILEVEL_OVER_FOLORA))
    return out


def markdown(step_rows, mem_rows, check_rows, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    if step_rows:
        r0 = step_rows[0]
        lines += [f"Step time, median of {r0['repeats']} interleaved rounds, batch "
                  f"{r0['batch_size']} x {r0['seq_len']} tokens, {r0['device']}, {r0['dtype']}, "
                  f"{r0['threads']} threads:", "",
                  "| model | method | step (ms) | forward part (ms) | rest (ms) | fwd/bwd per step "
                  "| step / 2 fwd | step / own fwds | MeZO-ref / step |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in step_rows:
            lines.append(
                f"| {r['model']} | {r['method']} | {1e3 * r['step_s']:.1f} | "
                f"{1e3 * r['forward_s']:.1f} | {1e3 * r['other_s']:.1f} | "
                f"{r['forwards_per_step']}/{r['backwards_per_step']} | "
                f"{r['step_over_2fwd'] if r['step_over_2fwd'] is not None else ''} | "
                f"{r['step_over_own_fwd'] if r['step_over_own_fwd'] is not None else ''} | "
                f"{r['mezo_ref_over_step'] if r['mezo_ref_over_step'] is not None else ''} |")
        lines.append("")
    if mem_rows:
        lines += [f"Peak memory above the loaded model ({mem_rows[0]['kind']}, each method in "
                  "its own process):", "",
                  "| model | method | weights (MiB) | extra peak (MiB) | extra over inference "
                  "(MiB) | = % of weights |", "|---|---|---:|---:|---:|---:|"]
        for r in mem_rows:
            over = r.get("extra_over_inference_bytes")
            lines.append(
                f"| {r['model']} | {r['method']} | {r['model_bytes'] / 2**20:.1f} | "
                f"{r['extra_peak_bytes'] / 2**20:.2f} | "
                f"{'' if over is None else f'{over / 2**20:.2f}'} | "
                f"{r.get('extra_over_inference_pct_of_model', '')} |")
        lines.append("")
    if check_rows:
        lines += ["| model | target | measured | goal | met |", "|---|---|---:|---|---|"]
        for c in check_rows:
            lines.append(f"| {c['model']} | {c['check']} | {c['value']} | {c['target']} | "
                         f"{'yes' if c['passed'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zofo-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="embedded default: random-init MiniLM shape, synthetic batch, few repeats")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"{', '.join(models_mod.MODEL_CHOICES)} or model folders "
                        "(default: minilm; --quick: minilm-random)")
    p.add_argument("--model", dest="models_single", default=None,
                   help="one model (same as --models NAME)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="rows to measure (default: all; --quick: all but the estimator "
                        f"variants {', '.join(ESTIMATOR_ROWS)})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--inner-steps", type=int, default=1,
                   help="Bilevel-ZOFO: inner_steps, the first-order steps of the lower copy S "
                        "per outer step (default 1)")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(models_mod.DTYPES))
    p.add_argument("--backend", default=None, help="kernel backend for ZO (default: fastest)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None,
                   help="folder for CSV/PNG/markdown (default: ./zofo-bench-results under the "
                        "current folder, wherever that is; the checkout's committed results "
                        "are written only when named, e.g. --output benchmarks/results)")
    p.add_argument("--tag", default=None, help="file name tag (default: quick or full)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("zofo-bench: --device cuda but CUDA is not available")
    models = args.models or ([args.models_single] if args.models_single else None) or (
        ["minilm-random"] if args.quick else ["minilm"])
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    if args.methods is None:
        args.methods = [m for m in METHODS if not (args.quick and m in ESTIMATOR_ROWS)]
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1:
        raise SystemExit("zofo-bench: --repeats, --batch-size, --seq-len must be positive")
    for name in models:
        if name not in models_mod.MODEL_CHOICES and not Path(name).exists():
            raise SystemExit(f"zofo-bench: unknown model {name!r}; expected one of "
                             f"{', '.join(models_mod.MODEL_CHOICES)} or a model folder")
    tag = args.tag or ("quick" if args.quick else "full")
    out = Path(args.output) if args.output else default_output()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd() + os.sep
    command = "zofo-bench " + " ".join(a.replace(cwd, "") for a in (
        argv if argv is not None else sys.argv[1:]))

    step_rows, mem_rows = [], []
    t0 = time.perf_counter()
    for name in models:
        step_rows += time_steps(name, args, device)
        gc.collect()
        if not args.no_memory:
            mem_rows += measure_memory(name, args)
    check_rows = checks(step_rows, mem_rows)

    from zofo_kernels.apps import plotting
    written = [out / f"steps_{tag}.csv", out / f"steps_{tag}.png"]
    _write_csv(written[0], step_rows)
    plotting.plot_bench(step_rows, written[1],
                        title=f"step time split, batch {args.batch_size} x {args.seq_len}")
    if mem_rows:
        written += [out / f"memory_{tag}.csv", out / f"memory_{tag}.png"]
        _write_csv(written[-2], mem_rows)
        plotting.plot_memory(mem_rows, written[-1])
    if check_rows:
        written.append(out / f"checks_{tag}.csv")
        _write_csv(written[-1], check_rows)
    md = markdown(step_rows, mem_rows, check_rows, command.strip())
    written.append(out / f"bench_{tag}.md")
    written[-1].write_text(md + "\n")
    print(md)
    print(f"zofo-bench: done in {time.perf_counter() - t0:.0f} s; wrote {len(written)} files "
          f"to {out}{os.sep}:")
    for path in written:
        print(f"  {path.name}")
    return 0


def default_output() -> Path:
    """``./zofo-bench-results`` under the current folder, also at the top of the source
    checkout: a run never overwrites the committed ``benchmarks/results`` unless ``--output``
    names it."""
    return Path.cwd() / "zofo-bench-results"


if __name__ == "__main__":
    sys.exit(main())
