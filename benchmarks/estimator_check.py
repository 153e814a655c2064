"""Check a zeroth-order gradient estimator in minutes: its cosine with the true gradient, and the
loss it removes per forward pass, on a small model where backprop is cheap.

    python benchmarks/estimator_check.py --quick                       # tiny-bert, seconds
    python benchmarks/estimator_check.py --model minilm --output benchmarks/results/estimators
    python benchmarks/estimator_check.py --model gemma3-270m --seeds 10 --budget 0 \\
        --estimators true-grad gauss-c1 sparse-c1 lowrank-c1 adapter-fo \\
        --output benchmarks/results/estimators

The model is the prompt-head classifier that ``zofo-train`` builds (``load_model(...,
head="prompt")``: MiniLM with its label-description head, a causal LM scoring label words), in
float32 and eval mode, every weight trainable; the batches are real SST-2 sentences in the
SST-2 prompt, drawn from ``train.tsv`` (three disjoint samples: the cosine batches, the training
stream, the fixed evaluation set). The estimators are the reference implementations of
``benchmarks/estimators_ref.py`` (materialised directions; a screening tool, not a fast one).

1. **Cosine** (``--seeds`` directions' seeds on ``--cos-batches`` batches, every estimator on
   the same seeds): for each seed, the cosine between the estimator's update vector and the
   backprop gradient of the same batch loss at the same weights, on the whole backbone and per
   parameter group. Also, per estimator: the same cosine had the finite differences been exact
   (directional derivatives <z, grad> in place of the measured ones; their gap is the
   finite-difference/float32 error), the correlation between the measured and exact derivatives,
   and the **limit cosine**, cos(E[update], grad): the best cosine that averaging infinitely many
   directions of this estimator could reach (1 for unbiased estimators; below 1 when the
   estimator only sees part of the gradient: a sparse mask, LOZO's V within a lazy period, an
   adapter's row space).
2. **Loss per forward pass** (``--budget`` forward-pass equivalents per estimator, a backward
   pass counted as 2): plain SGD steps theta <- theta - lr_e * update from the same starting
   weights on the same stream of training batches; the mean loss on the fixed evaluation set is
   recorded every ``--eval-every`` forward-pass equivalents. Step sizes are matched by **equal
   expected update norm at the start**: lr_e = ref_lr * mean|update of gauss-c1| / mean|update
   of e|, the means taken over the cosine phase's seeds (``--ref-lr`` is MeZO's lr, 1e-5 by
   default: the SST-2 study's choice on MiniLM). Every estimator thus moves the weights as far
   per step as MeZO does at its lr; FZOO's normalisation (and nothing else) then changes its
   step length as the losses' spread changes.

Output (``--output``, default ``./estimator-check-results``): ``<tag>.md`` (the command, the
tables), ``<tag>_summary.csv``, ``<tag>_groups.csv`` (per-group cosines), ``<tag>_seeds.csv``
(every seed's cosine), ``<tag>_curves.csv`` and ``<tag>.png`` (evaluation loss against forward
passes, and the cosines).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import estimators_ref as E  # noqa: E402

SST2_DEFAULT = HERE.parent.parent / "shared" / "data" / "sst2"
GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")


def group_of(name: str) -> str:
    """The parameter group of a weight, by its name (BERT and Gemma/Llama/OPT namings)."""
    n = name.lower()
    if "norm" in n:
        return "norms"
    if "embed" in n:
        return "embeddings"
    if any(s in n for s in ("attention", "attn", "query", "key", "value")):
        return "attention"
    if any(s in n for s in ("intermediate", "mlp", "output.dense", "fc1", "fc2", "ffn")):
        return "mlp"
    if "head" in n or "classifier" in n or "score" in n:
        return "head"
    return "other"


# --------------------------------------------------------------------------- estimators

def build_estimators(args, names: Sequence[str], params: Sequence[torch.Tensor]) -> Dict[str, E.Estimator]:
    """Every candidate, keyed by name, with this run's settings."""
    eps, n, r = args.eps, args.n_dirs, args.rank
    bases = E.lora_bases(names, params, args.lora_r, args.seed)
    out: Dict[str, E.Estimator] = {}

    def add(est):
        out[est.name] = est

    add(E.TrueGradient())
    add(E.ZOEstimator("gauss-c1", E.Dense("gauss"), 1, True, eps,
                      description="MeZO: Gaussian, central difference, 1 direction"))
    not_embed = [group_of(name) != "embeddings" for name in names]
    if any(not_embed) and not all(not_embed):
        add(E.ZOEstimator("noembed-c1", E.Subset(not_embed), 1, True, eps,
                          description="Gaussian on every weight but the embedding matrices, "
                                      "central"))
    add(E.ZOEstimator("rade-c1", E.Dense("rade"), 1, True, eps,
                      description="Rademacher, central, 1 direction"))
    add(E.ZOEstimator("gauss-f1", E.Dense("gauss"), 1, False, eps,
                      description="Gaussian, forward difference, 1 direction"))
    add(E.ZOEstimator(f"gauss-c{n}", E.Dense("gauss"), n, True, eps,
                      description=f"Gaussian, central, mean of {n} directions"))
    add(E.ZOEstimator(f"gauss-f{n}", E.Dense("gauss"), n, False, eps,
                      description=f"Gaussian, forward, {n} directions, one unperturbed loss"))
    add(E.ZOEstimator(f"rade-f{n}", E.Dense("rade"), n, False, eps,
                      description=f"Rademacher, forward, {n} directions (FZOO without its "
                                  "normalisation)"))
    add(E.ZOEstimator(f"fzoo-{n}", E.Dense("rade"), n, False, eps, fzoo=True,
                      description=f"FZOO: {n} one-sided Rademacher directions, step / std of "
                                  "their losses"))
    add(E.ZOEstimator("sparse-c1", E.Sparse(args.sparse_keep), 1, True, eps,
                      description=f"Sparse-MeZO: the {args.sparse_keep:.0%} smallest-magnitude "
                                  "weights of each matrix, central"))
    add(E.ZOEstimator("lowrank-c1", E.LowRank(r), 1, True, eps,
                      description=f"low-rank U V^T/sqrt({r}) per matrix, fresh U, V (SubZero-like)"))
    add(E.ZOEstimator("lozo-c1", E.LowRank(r, args.lozo_period, args.seed), 1, True, eps,
                      description=f"LOZO: rank {r}, V kept {args.lozo_period} steps"))
    # the same estimators through the package itself (ZOOptimizer on the fused kernels)
    add(E.LibraryStep("lib-mezo", "the package's MeZO step (Gaussian, central)", eps=eps))
    add(E.LibraryStep("lib-sparse", f"the package's sparse step (sparse_fraction "
                      f"{args.sparse_keep:g}, every tensor, tau per step)", eps=eps,
                      sparse_fraction=args.sparse_keep))
    add(E.LibraryStep("lib-lowrank", f"the package's low-rank step (lowrank={r}, fresh V)",
                      eps=eps, lowrank=r))
    add(E.LibraryStep(f"lib-fzoo-{n}", f"the package's FZOO step ({n} forward Rademacher "
                      "directions, normalize='std')", eps=eps, estimator="forward",
                      n_directions=n, distribution="rademacher", normalize="std"))
    if bases:
        known = E.AdapterProjection(bases)
        add(known)
        add(E.ZOEstimator("adapter-span-c1", E.AdapterSpan(bases), 1, True, eps,
                          description=f"Gaussian in the row spaces of LoRA A (r={args.lora_r}) "
                                      "of the q/v matrices only, central"))
        add(E.ZOEstimator("adapter-hybrid-c1", E.AdapterComplement(bases), 1, True, eps,
                          known=known,
                          description="adapter-fo's free part + central Gaussian ZO on its "
                                      "complement"))
    return out


# --------------------------------------------------------------------------- data and model

def load(args):
    from zofo_kernels.apps import data as data_mod
    from zofo_kernels.apps import models
    from zofo_kernels.integrations.prompting import PromptSpec

    loaded = models.load_model(args.model, dtype="float32", seed=args.seed, head="prompt")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    spec = PromptSpec()
    train_file = Path(args.data) / "train.tsv"
    pool = data_mod.read_examples(train_file)
    n_cos = args.cos_batches * args.batch_size
    picked = data_mod.sample(pool, n_cos + args.train_examples + args.eval_examples, args.seed)

    def enc(examples):
        wrapped = [data_mod.Example(spec.text(e.text), e.label) for e in examples]
        return data_mod.Encoded(wrapped, loaded.tokenizer, args.max_length,
                                add_special_tokens=loaded.add_special_tokens)

    cos_enc = enc(picked[:n_cos])
    cos_batches = [cos_enc.batch(slice(i * args.batch_size, (i + 1) * args.batch_size))
                   for i in range(args.cos_batches)]
    train_enc = enc(picked[n_cos:n_cos + args.train_examples])
    eval_enc = enc(picked[n_cos + args.train_examples:])
    return loaded, model, cos_batches, train_enc, eval_enc


class Harness:
    """The model as estimators see it: its weights, the current batch's loss and gradient."""

    def __init__(self, model, params_named):
        from zofo_kernels.apps.models import classification_loss
        self.model = model
        self.names = [n for n, _ in params_named]
        self.params = [p for _, p in params_named]
        self.batch: Optional[dict] = None
        self._loss = classification_loss
        self.problem = E.Problem(self.params, self.names, self.loss, self.grad)

    def loss(self) -> float:
        with torch.no_grad():
            return float(self._loss(self.model, self.batch))

    def grad(self) -> List[torch.Tensor]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            self._loss(self.model, self.batch).backward()
        out = [p.grad.detach() if p.grad is not None else torch.zeros_like(p)
               for p in self.params]
        for p in self.params:
            p.grad = None
        return out

    @torch.no_grad()
    def restore(self, weights: Sequence[torch.Tensor]) -> None:
        for p, w in zip(self.params, weights):
            p.copy_(w)


# --------------------------------------------------------------------------- phase 1: cosines

def cosine_phase(args, h: Harness, estimators: Dict[str, E.Estimator], batches, theta0, log):
    groups = [group_of(n) for n in h.names]
    present = [g for g in GROUPS if g in groups]
    masks = {g: [x == g for x in groups] for g in present}
    seed_rows, stats = [], {name: dict(cos=[], exact=[], norms=[], pairs=[], limit=[],
                                       groups={g: [] for g in present}, seconds=0.0)
                            for name in estimators}
    group_rows = []
    per_batch = [args.seeds // len(batches) + (1 if b < args.seeds % len(batches) else 0)
                 for b in range(len(batches))]
    for b, batch in enumerate(batches):
        h.batch = batch
        h.restore(theta0)
        grad32 = grad = h.grad()
        if sum(g.numel() for g in grad) <= 64_000_000:  # float64 once (no copy per dot)
            grad = [g.double() for g in grad32]
        gg = [E.dot1(g, g) for g in grad]
        g2 = sum(gg)
        gsum = {g: sum(x for x, m in zip(gg, masks[g]) if m) for g in present}
        for g in present:
            numel = sum(p.numel() for p, m in zip(h.params, masks[g]) if m)
            group_rows.append(dict(batch=b, group=g, numel=numel, grad_sq_share=gsum[g] / g2))

        def cos_of(uu, ug, mask=None):
            pick = (lambda i: True) if mask is None else (lambda i: mask[i])
            su = sum(x for i, x in enumerate(uu) if pick(i))
            sg = g2 if mask is None else sum(x for i, x in enumerate(gg) if pick(i))
            den = math.sqrt(su * sg)
            return sum(x for i, x in enumerate(ug) if pick(i)) / den if den > 0 else float("nan")

        for name, est in estimators.items():
            st, t0 = stats[name], time.perf_counter()
            for s in range(per_batch[b]):
                seed = E.mix_seed(args.seed, 17, b, s)
                est_out = est.estimate(h.problem, seed, s)
                uu, ug = E.param_dots(est_out.update, grad)
                cos = cos_of(uu, ug)
                st["cos"].append(cos)
                st["norms"].append(math.sqrt(sum(uu)))
                gc = {g: cos_of(uu, ug, masks[g]) for g in present}
                for g in present:
                    st["groups"][g].append(gc[g])
                exact_cos = float("nan")
                if est_out.directions:
                    exact = [E.dot(z, grad) for z in est_out.directions]
                    st["pairs"].extend(zip(est_out.derivs, exact))
                    exact_cos = E.cosine(est_out.combine(exact), grad)
                    st["exact"].append(exact_cos)
                if s == 0:  # the estimator's per-step state (mask, V) exists now
                    st["limit"].append(E.cosine(est.expected(grad32, h.problem), grad))
                seed_rows.append(dict(estimator=name, batch=b, seed_index=s, cosine=cos,
                                      cosine_exact_derivatives=exact_cos,
                                      update_norm=st["norms"][-1],
                                      **{f"cos_{g}": gc[g] for g in present}))
                del est_out
            h.restore(theta0)
            st["seconds"] += time.perf_counter() - t0
            log(f"  cosine  {name:<18} batch {b}: mean {statistics.fmean(st['cos']):+.3e} "
                f"({per_batch[b]} seeds, {time.perf_counter() - t0:.1f} s)")
    return stats, seed_rows, group_rows, present


def summarise_cosines(stats, est_names):
    out = {}
    for name in est_names:
        st = stats[name]
        c = st["cos"]
        row = dict(cos_mean=statistics.fmean(c),
                   cos_sd=statistics.stdev(c) if len(c) > 1 else 0.0,
                   cos_median=statistics.median(c),
                   cos_positive=sum(x > 0 for x in c) / len(c),
                   cos_exact_mean=statistics.fmean(st["exact"]) if st["exact"] else float("nan"),
                   limit_cos=statistics.fmean(st["limit"]),
                   update_norm=statistics.fmean(st["norms"]), seeds=len(c),
                   cosine_seconds=st["seconds"])
        if len(st["pairs"]) > 2:
            fd = torch.tensor([p[0] for p in st["pairs"]], dtype=torch.float64)
            ex = torch.tensor([p[1] for p in st["pairs"]], dtype=torch.float64)
            row["deriv_corr"] = float(torch.corrcoef(torch.stack([fd, ex]))[0, 1])
        else:
            row["deriv_corr"] = float("nan")
        out[name] = row
    return out


# --------------------------------------------------------------------------- phase 2: training

def training_phase(args, h: Harness, estimators, lrs, theta0, train_enc, eval_enc, log):
    from zofo_kernels.apps import data as data_mod
    from zofo_kernels.apps.models import mean_loss

    h.restore(theta0)
    start_loss = mean_loss(h.model, eval_enc, args.eval_batch_size)
    curves, results = [], {}
    for name, est in estimators.items():
        runs = []
        for t in range(args.train_seeds):
            h.restore(theta0)
            stream = data_mod.BatchStream(train_enc, args.batch_size, args.seed + 100 + t)
            spent, step, next_eval, t0 = 0, 0, args.eval_every, time.perf_counter()
            curve = [(0, 0, start_loss)]
            diverged = False
            while spent < args.budget:
                h.batch = next(stream)
                out = est.estimate(h.problem, E.mix_seed(args.seed, 29, t, step), step)
                if not all(u is None or bool(torch.isfinite(u).all()) for u in out.update):
                    diverged = True
                    break
                E.apply_update(h.params, out.update, lrs[name])
                del out
                spent += est.forwards_per_step + 2 * est.backwards_per_step
                step += 1
                if spent >= next_eval or spent >= args.budget:
                    loss = mean_loss(h.model, eval_enc, args.eval_batch_size)
                    curve.append((spent, step, loss))
                    while next_eval <= spent:
                        next_eval += args.eval_every
                    if not math.isfinite(loss):
                        diverged = True
                        break
            seconds = time.perf_counter() - t0
            for spent_i, step_i, loss in curve:
                curves.append(dict(estimator=name, train_seed=t, forward_equivalents=spent_i,
                                   steps=step_i, eval_loss=loss))
            runs.append(dict(final=curve[-1][2], spent=curve[-1][0], steps=curve[-1][1],
                             seconds=seconds, diverged=diverged))
            log(f"  train   {name:<18} seed {t}: eval loss {start_loss:.5f} -> "
                f"{curve[-1][2]:.5f} in {curve[-1][1]} steps ({seconds:.0f} s)")
        finals = [r["final"] for r in runs]
        drop = [start_loss - f for f in finals]
        results[name] = dict(
            start_eval_loss=start_loss, final_eval_loss=statistics.fmean(finals),
            loss_drop=statistics.fmean(drop),
            loss_drop_sd=statistics.stdev(drop) if len(drop) > 1 else float("nan"),
            drop_per_1000_fwd=statistics.fmean(
                1000 * d / max(1, r["spent"]) for d, r in zip(drop, runs)),
            train_steps=runs[0]["steps"], train_seconds=sum(r["seconds"] for r in runs),
            diverged=any(r["diverged"] for r in runs))
    h.restore(theta0)
    return start_loss, curves, results


# --------------------------------------------------------------------------- output

def _f(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def write_outputs(args, out: Path, tag: str, command: str, info: dict, estimators, summary,
                  group_rows, groups_present, stats, seed_rows, curves, start_loss):
    out.mkdir(parents=True, exist_ok=True)
    names = list(estimators)
    fields = ["estimator", "description", "forwards_per_step", "backwards_per_step",
              "cos_mean", "cos_sd", "cos_median", "cos_positive", "cos_exact_mean", "deriv_corr",
              "limit_cos", "update_norm", "seeds", "lr", "start_eval_loss", "final_eval_loss",
              "loss_drop", "loss_drop_sd", "drop_per_1000_fwd", "train_steps", "diverged",
              "cosine_seconds", "train_seconds"]
    with open(out / f"{tag}_summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for n in names:
            w.writerow(dict(summary[n], estimator=n, description=estimators[n].description,
                            forwards_per_step=estimators[n].forwards_per_step,
                            backwards_per_step=estimators[n].backwards_per_step))
    # per-group: the gradient's share and every estimator's mean cosine inside each group
    gstats = {}
    for g in groups_present:
        rows = [r for r in group_rows if r["group"] == g]
        gstats[g] = dict(numel=rows[0]["numel"],
                         share=statistics.fmean(r["grad_sq_share"] for r in rows))
    total = sum(v["numel"] for v in gstats.values())
    with open(out / f"{tag}_groups.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["group", "numel", "weight_share", "grad_sq_share", "ideal_cos_probe_only_group"]
                   + [f"cos_{n}" for n in names])
        for g in groups_present:
            s = gstats[g]
            ideal = math.sqrt(2 / math.pi) * math.sqrt(s["share"] / s["numel"])
            w.writerow([g, s["numel"], s["numel"] / total, s["share"], ideal]
                       + [statistics.fmean(stats[n]["groups"][g]) for n in names])
    with open(out / f"{tag}_seeds.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(seed_rows[0]))
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                    for r in seed_rows)
    if curves:
        with open(out / f"{tag}_curves.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(curves[0]))
            w.writeheader()
            w.writerows(curves)
    plot(out / f"{tag}.png", info, names, summary, curves)

    d = info["num_parameters"]
    lines = [f"# Estimator check: {info['model']} on SST-2", "",
             f"Command: `{command}`", "",
             f"{info['model']} with the prompt head, {d:,} weights (all perturbed / trained), "
             f"float32, {info['device']}; cosine batches of {args.batch_size} SST-2 training "
             f"sentences (max {args.max_length} tokens), {args.seeds} seeds over "
             f"{args.cos_batches} batch(es), eps {args.eps:g}; "
             + (f"training phase: {args.budget} forward-pass equivalents per trained estimator "
                f"(a backward pass counts 2), {args.train_seeds} trajectory(ies) each, evaluation "
                f"loss on {info['eval_examples']} held-out training sentences (start "
                f"{_f(start_loss, '.5f')}); " if curves else "no training phase (--budget 0); ")
             + f"step sizes matched to equal expected update norm at the start, the reference "
             f"being gauss-c1 at lr {args.ref_lr:g}. Whole run: {info['seconds']:.0f} s."]
    if args.note:
        lines += ["", args.note]
    lines += ["", f"For scale: one Gaussian direction with exact derivatives has E[cos] = "
              f"sqrt(2/pi)/sqrt(d) = {math.sqrt(2 / math.pi / d):.2e} on {d:,} weights.", "",
              "| estimator | fwd + bwd / step | cos mean ± sd | P(cos>0) | cos, exact derivs "
              "| fd-exact corr | limit cos | mean update norm | matched lr | eval-loss drop "
              "| drop / 1000 fwd | steps |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        s, est = summary[n], estimators[n]
        cost = f"{est.forwards_per_step}" + (f" + {est.backwards_per_step}"
                                              if est.backwards_per_step else "")
        drop = s.get("loss_drop")
        drop_txt = _f(drop, "+.2e")
        if s.get("loss_drop_sd") is not None and not math.isnan(s.get("loss_drop_sd", math.nan)):
            drop_txt += f" ± {s['loss_drop_sd']:.1e}"
        if s.get("diverged"):
            drop_txt += " (diverged)"
        lines.append(f"| `{n}` | {cost} | {s['cos_mean']:.2e} ± {s['cos_sd']:.1e} | "
                     f"{s['cos_positive']:.2f} | {_f(s['cos_exact_mean'], '.2e')} | "
                     f"{_f(s['deriv_corr'], '.3f')} | {_f(s['limit_cos'], '.3f')} | "
                     f"{s['update_norm']:.3g} | {_f(s.get('lr'), '.3g')} | {drop_txt} | "
                     f"{_f(s.get('drop_per_1000_fwd'), '+.2e')} | "
                     f"{s.get('train_steps', 'n/a')} |")
    lines += ["", "Estimators:", ""]
    lines += [f"- `{n}`: {estimators[n].description}" for n in names]
    lines += ["", "Columns: *cos* is the cosine between the update vector and the backprop "
              "gradient of the same batch loss (per seed; mean ± sd over seeds); *cos, exact "
              "derivs* the same with the exact directional derivatives <z, grad> in place of the "
              "finite differences; *fd-exact corr* their correlation over all seeds and "
              "directions; *limit cos* cos(E[update], grad), what averaging infinitely many "
              "directions could reach (below 1: the estimator sees only part of the gradient); "
              "*matched lr* the SGD step size giving the same mean update norm as gauss-c1 at "
              "the reference lr; *eval-loss drop* start minus end evaluation loss after the "
              "budget (mean ± sd over trajectories).", "",
              "## Per parameter group", "",
              "Share of the weights and of the squared gradient norm, the ideal cosine of one "
              "exact Gaussian direction confined to the group (sqrt(2/pi) * |grad_G| / |grad| / "
              "sqrt(d_G)), and each estimator's mean cosine with the gradient inside the group.",
              "", "| group | weights | share of weights | share of grad² | ideal cos, probe only "
              "this group | " + " | ".join(f"`{n}`" for n in names) + " |",
              "|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for g in groups_present:
        s = gstats[g]
        ideal = math.sqrt(2 / math.pi) * math.sqrt(s["share"] / s["numel"])
        lines.append(f"| {g} | {s['numel']:,} | {s['numel'] / total:.3f} | {s['share']:.3g} | "
                     f"{ideal:.2e} | " + " | ".join(
                         f"{statistics.fmean(stats[n]['groups'][g]):.1e}" for n in names) + " |")
    lines += ["", f"Files: `{tag}_summary.csv`, `{tag}_groups.csv`, `{tag}_seeds.csv` (every "
              f"seed), " + (f"`{tag}_curves.csv`, " if curves else "") + f"`{tag}.png`.", ""]
    (out / f"{tag}.md").write_text("\n".join(lines))
    return out / f"{tag}.md"


def plot(path: Path, info, names, summary, curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5.2),
                                   gridspec_kw=dict(width_ratios=[1.6, 1]))
    cmap = plt.get_cmap("tab20")
    colours = {n: cmap(i % 20) for i, n in enumerate(names)}
    for n in names:
        pts = [c for c in curves if c["estimator"] == n and c["train_seed"] == 0]
        if pts:
            ax0.plot([c["forward_equivalents"] for c in pts], [c["eval_loss"] for c in pts],
                     marker=".", label=n, color=colours[n],
                     linestyle="--" if summary[n].get("backwards_per_step", 0) not in (0, "0")
                     else "-")
    zo = [c["eval_loss"] for c in curves if c["train_seed"] == 0
          and summary[c["estimator"]].get("backwards_per_step", 0) in (0, "0")]
    title = f"{info['model']}: SGD at equal update norm (first trajectory)"
    if zo and all(math.isfinite(y) for y in zo):
        low, high = min(zo), max(zo)
        pad = 0.25 * (high - low) if high > low else 1e-3
        ax0.set_ylim(low - pad, high + pad)  # backprop rows may leave it: they are clipped
        title += "\ny range fitted to the ZO rows; dashed: rows with a backward pass"
    ax0.set_xlabel("forward passes (a backward pass counts 2)")
    ax0.set_ylabel("mean loss on the fixed evaluation set")
    ax0.set_title(title, fontsize=10)
    if curves:
        ax0.legend(fontsize=7, ncol=2)
    else:
        ax0.text(0.5, 0.5, "no training phase (--budget 0)", ha="center", va="center",
                 transform=ax0.transAxes)
    ys = list(range(len(names)))
    means = [summary[n]["cos_mean"] for n in names]
    errs = [summary[n]["cos_sd"] / math.sqrt(max(1, summary[n]["seeds"])) for n in names]
    floor = 1e-7
    ax1.barh(ys, [max(m, floor) for m in means], xerr=errs, color=[colours[n] for n in names],
             log=True)
    for y, m in zip(ys, means):
        if m <= floor:
            ax1.text(floor * 1.5, y, f"{m:.1e}", va="center", fontsize=7)
    ax1.set_yticks(ys)
    ax1.set_yticklabels(names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("mean cosine with the backprop gradient (± s.e.)")
    ax1.set_title("cosine per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

QUICK = dict(model="tiny-bert", batch_size=16, max_length=32, seeds=4, cos_batches=1,
             budget=12, eval_every=6, train_examples=32, eval_examples=16, lozo_period=3,
             rank=2, lora_r=4, threads=1)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny-bert, few seeds, a short training phase, 1 thread (seconds)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", type=Path, default=SST2_DEFAULT,
                   help="folder with train.tsv (default: ../shared/data/sst2 of the checkout)")
    p.add_argument("--estimators", nargs="+", default=None,
                   help="names to run (default: all); gauss-c1 is always measured")
    p.add_argument("--train-estimators", nargs="+", default=None,
                   help="the estimators of the training phase (default: every one measured)")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--cos-batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--n-dirs", type=int, default=4, help="directions of the multi-direction rows")
    p.add_argument("--rank", type=int, default=4, help="rank of the low-rank directions")
    p.add_argument("--lozo-period", type=int, default=50, help="steps LOZO keeps V")
    p.add_argument("--sparse-keep", type=float, default=0.2,
                   help="fraction of each matrix's weights Sparse-MeZO perturbs")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--ref-lr", type=float, default=1e-5,
                   help="gauss-c1's lr; every other estimator's is matched to its update norm")
    p.add_argument("--budget", type=int, default=400,
                   help="forward-pass equivalents per estimator in the training phase (0: skip)")
    p.add_argument("--train-seeds", type=int, default=1)
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; --quick: 1)")
    p.add_argument("--tag", default=None, help="file name stem (default: the model's name)")
    p.add_argument("--note", default="", help="a line for the report (e.g. machine conditions)")
    p.add_argument("--output", type=Path, default=Path("estimator-check-results"))
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_")
                 for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
        if args.tag is None:
            args.tag = "quick"
    if args.tag is None:
        args.tag = Path(str(args.model)).name
    if args.seeds < 2 or args.cos_batches < 1 or args.seeds < args.cos_batches:
        p.error("--seeds must be at least 2 and at least --cos-batches")
    return args


def run(args, argv_text: str, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv_text, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv_text: str, log) -> dict:
    t_start = time.perf_counter()
    loaded, model, cos_batches, train_enc, eval_enc = load(args)
    named = [(n, p) for n, p in model.named_parameters()]
    h = Harness(model, named)
    everything = build_estimators(args, h.names, h.params)
    wanted = args.estimators or list(everything)
    unknown = [n for n in wanted if n not in everything]
    if unknown:
        raise SystemExit(f"estimator_check: unknown estimator(s) {', '.join(unknown)}; known: "
                         f"{', '.join(everything)}")
    if "gauss-c1" not in wanted:
        wanted = ["gauss-c1"] + list(wanted)
    estimators = {n: everything[n] for n in everything if n in wanted}
    theta0 = [p.detach().clone() for p in h.params]
    log(f"estimator_check: {args.model}, {sum(p.numel() for p in h.params):,} weights, "
        f"{len(estimators)} estimators, {args.seeds} seeds")
    stats, seed_rows, group_rows, present = cosine_phase(args, h, estimators, cos_batches,
                                                         theta0, log)
    summary = summarise_cosines(stats, estimators)
    for n, est in estimators.items():
        summary[n]["backwards_per_step"] = est.backwards_per_step
    ref_norm = summary["gauss-c1"]["update_norm"]
    for n in estimators:
        norm_n = summary[n]["update_norm"]
        summary[n]["lr"] = args.ref_lr * ref_norm / norm_n if norm_n > 0 else float("nan")
    curves, start_loss = [], float("nan")
    if args.budget > 0:
        trained = {n: e for n, e in estimators.items()
                   if args.train_estimators is None or n in args.train_estimators}
        missing = set(args.train_estimators or ()) - set(estimators)
        if missing:
            raise SystemExit(f"estimator_check: --train-estimators {', '.join(sorted(missing))} "
                             "are not among the estimators measured")
        lrs = {n: summary[n]["lr"] for n in trained}
        start_loss, curves, results = training_phase(args, h, trained, lrs, theta0,
                                                     train_enc, eval_enc, log)
        for n in trained:
            summary[n].update(results[n])
    info = dict(model=args.model, num_parameters=sum(p.numel() for p in h.params),
                device="cpu", eval_examples=len(eval_enc), seconds=time.perf_counter() - t_start)
    md = write_outputs(args, Path(args.output), args.tag, argv_text, info, estimators, summary,
                       group_rows, present, stats, seed_rows, curves, start_loss)
    log(f"estimator_check: wrote {md.resolve()} and its csv/png beside it")
    return dict(summary=summary, estimators=estimators, markdown=md, start_loss=start_loss,
                curves=curves, groups=group_rows)


def replot(folder: Path, tag: str, model: str) -> Path:
    """Redraw ``<tag>.png`` from the CSVs a run wrote (``--replot``)."""
    summary = {}
    for r in csv.DictReader(open(folder / f"{tag}_summary.csv", newline="")):
        summary[r["estimator"]] = dict(cos_mean=float(r["cos_mean"]), cos_sd=float(r["cos_sd"]),
                                       seeds=int(r["seeds"]),
                                       backwards_per_step=int(r["backwards_per_step"]))
    curves = []
    if (folder / f"{tag}_curves.csv").is_file():
        curves = [dict(estimator=r["estimator"], train_seed=int(r["train_seed"]),
                       forward_equivalents=int(r["forward_equivalents"]),
                       eval_loss=float(r["eval_loss"]))
                  for r in csv.DictReader(open(folder / f"{tag}_curves.csv", newline=""))]
    path = folder / f"{tag}.png"
    plot(path, dict(model=model), list(summary), summary, curves)
    return path


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--replot":
        if len(argv) != 4:
            raise SystemExit("usage: estimator_check.py --replot FOLDER TAG MODEL")
        print(replot(Path(argv[1]), argv[2], argv[3]))
        return 0
    args = parse(argv)
    words = list(argv)
    command = "python benchmarks/estimator_check.py " + " ".join(shlex.quote(w) for w in words)
    run(args, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
