"""The machinery of python_tests/docs: every code block of the README and the docs, run.

The tool is Sybil (a maintained documentation-testing library, in the ``test`` extra): it
parses the Markdown, finds the fenced blocks and evaluates them in order with one namespace
per page, so that a block may use what an earlier block of the same page defined. What a
block means to this test:

* ``python`` blocks run as written. Names a block uses before defining them are the reader's
  own objects (``model``, ``loader``, ``peft_model``, ``batch``, ``training_args``, ...):
  :data:`FIXTURES` supplies tiny ones (a 2-layer BERT of width 32, four-sentence batches),
  per page where a name means something else there (:data:`PAGE_FIXTURES`).
* ``bash`` blocks: every command is first checked as written (its program's own argument
  parser accepts the command line: ``zofo-train``'s ``parse`` with all its checks,
  ``zofo-bench``'s parser, each script's parser; ``pip install``'s extras exist in
  pyproject.toml; ``pytest``'s paths exist; a shell script passes ``bash -n``; ``torchrun``'s
  own arguments and then its script's or module's), then the commands of ``zofo-train``,
  ``zofo-bench``, the kernel benchmark, its plot and the example script run on a tiny model
  for a step or two (:data:`TINY`: those options are appended, so they win over the
  command's own) from a temporary folder, beside which ``../shared/data/sst2`` holds a tiny
  SST-2-like data set (a page's later ``zofo-bench`` commands, which on the tiny model
  would repeat its first, are checked only). ``pip`` and ``pytest`` commands are checked,
  never run.
* a block whose first line is the comment ``# not run by python_tests/docs (REASON)`` is
  checked only (Python: it compiles and its imports resolve; shell: as above).
* ``text`` blocks and blocks without a language are not code.

Every block of a page runs in one test (the page's blocks build on each other), in a fresh
temporary folder that is also the current folder, so nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib.util
import itertools
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from sybil import Document
from sybil.parsers.markdown import CodeBlockParser

REPO = Path(__file__).resolve().parents[2]

# the pages whose blocks run: the README, docs/, docs/optimizers/ and the benchmarks' README
PAGES = sorted(["README.md", "benchmarks/README.md"]
               + [p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")]
               + [p.relative_to(REPO).as_posix()
                  for p in (REPO / "docs" / "optimizers").glob("*.md")])

# fence languages: these run; these are not code; anything else fails the test (teach it here)
RUN_LANGUAGES = ("python", "bash")
TEXT_LANGUAGES = ("", "text")

NOT_RUN = re.compile(r"^\s*#\s*not run by python_tests/docs\b\s*(?P<reason>.*)$")

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$", re.M)


def fences(text: str) -> List[tuple]:
    """(line, language, body) of every fenced block of a Markdown text."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            fence, start = m.group("fence"), i
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            info = m.group("info").strip()
            out.append((start + 1, info.split()[0] if info else "",
                        "\n".join(lines[start + 1:j])))
            i = j + 1
        else:
            i += 1
    return out


# --------------------------------------------------------------------------- tiny objects

SENTENCES = [
    ("a gorgeous , witty , seductive movie", 1), ("the acting is wooden and lifeless", 0),
    ("one of the best films of the year", 1), ("a tedious , joyless exercise", 0),
    ("warm , funny and deeply moving", 1), ("the plot makes no sense at all", 0),
    ("an absolute delight from start to finish", 1), ("i wanted my two hours back", 0),
    ("sharp writing and a terrific cast", 1), ("dull , flat and far too long", 0),
    ("a triumph of imagination", 1), ("the jokes fall embarrassingly flat", 0),
    ("beautifully shot and well acted", 1), ("a mess of cliches", 0),
    ("smart , tender and surprising", 1), ("painfully slow and predictable", 0),
]


def write_sst2_like(folder: Path, n_train: int = 48, n_dev: int = 16) -> Path:
    """A tiny SST-2-like folder (train.tsv, dev.tsv with sentence and label columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(f"{text} , take {i}", label)
            for i, (text, label) in enumerate(itertools.islice(itertools.cycle(SENTENCES),
                                                               n_train + n_dev))]
    for name, part in (("train.tsv", rows[:n_train]), ("dev.tsv", rows[n_train:])):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part))
    return folder


class Objects:
    """The tiny objects a page's blocks may ask for, built on first use and kept per page."""

    def __init__(self, run: "PageRun"):
        self.run = run
        self._cache: Dict[str, object] = {}

    def cached(self, key: str, build: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def tokenizer(self):
        from zofo_kernels.apps import models
        return self.cached("tokenizer", lambda: models.load_tokenizer("tiny-bert"))

    def batch(self, i: int = 0, n: int = 4):
        def build():
            import torch
            rows = [SENTENCES[(i * n + k) % len(SENTENCES)] for k in range(n)]
            enc = self.tokenizer()([t for t, _ in rows], padding=True, truncation=True,
                                   max_length=32, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([l for _, l in rows])}
        return self.cached(f"batch{i}_{n}", build)

    def tiny_bert(self):
        """A new random-init tiny BERT sequence classifier (a new one on every call), in eval
        mode as ``from_pretrained`` returns a model."""
        import torch
        from zofo_kernels.apps import models
        torch.manual_seed(0)
        return models.build_random("tiny-bert",
                                   pad_token_id=self.tokenizer().pad_token_id).eval()

    def tiny_bert_lora(self):
        from zofo_kernels.apps import models
        return models.add_peft(self.tiny_bert(), "lora")

    def examples(self, rows):
        tok = self.tokenizer()
        enc = tok([t for t, _ in rows], truncation=True, max_length=32)
        return [{"input_ids": ids, "attention_mask": mask, "labels": label}
                for ids, mask, (_, label) in zip(enc["input_ids"], enc["attention_mask"], rows)]

    def tiny_model_folder(self) -> Path:
        """A local model folder (tiny BERT and its tokenizer), for the example script."""
        def build():
            folder = self.run.workdir.parent / "tiny-bert-model"
            self.tiny_bert().save_pretrained(str(folder))
            self.tokenizer().save_pretrained(str(folder))
            return folder
        return self.cached("model_folder", build)


def _accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _training_args(o: Objects):
    import torch
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=str(o.run.workdir / "trainer_output"), max_steps=2,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-5,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)


def _collator(o: Objects):
    from transformers import DataCollatorWithPadding
    return DataCollatorWithPadding(o.tokenizer())


def _batches_for(o: Objects):
    def my_batches(k):
        """One outer step's batches: B_f, k lower batches, a fresh B_g."""
        yield o.batch(0), [o.batch(1)] * k, o.batch(2)
    return my_batches


def _plain_pytorch_pair(o: Objects):
    """The parts of docs/optimizers/zofo.md's plain-PyTorch block: a linear backbone and a
    bias vector as the PEFT block, in two copies."""
    import torch
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2)
    upper, lower = [torch.zeros(2, requires_grad=True)], [torch.zeros(2, requires_grad=True)]
    active = {"level": "upper"}
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])

    def select_adapter(level):
        active["level"] = level

    def loss_fn(batch):
        bias = (upper if active["level"] == "upper" else lower)[0]
        return torch.nn.functional.cross_entropy(lin(x) + bias, y)

    return dict(backbone_params=list(lin.parameters()), upper_params=upper,
                lower_params=lower, select_adapter=select_adapter, loss_fn=loss_fn)


# name -> builder(objects) of what the name stands for, where a page does not say otherwise
FIXTURES: Dict[str, Callable[[Objects], object]] = {
    "model": lambda o: o.tiny_bert(),
    "peft_model": lambda o: o.tiny_bert_lora(),
    "batch": lambda o: o.batch(0),
    "loader": lambda o: [o.batch(0), o.batch(1)],
    "my_part_of_the_data": lambda o: [o.batch(0), o.batch(1)],
    "my_batches": _batches_for,
    "tokenizer": lambda o: o.tokenizer(),
    "training_args": _training_args,
    "train": lambda o: o.examples(SENTENCES[:12]),
    "dev": lambda o: o.examples(SENTENCES[12:]),
    "collator": _collator,
    "compute_metrics": lambda o: _accuracy,
    "loss_fn": lambda o: (lambda model, batch: model(**batch).loss),
    "num_steps": lambda o: 1,
    "upper": lambda o: itertools.repeat(o.batch(0)),
    "lower": lambda o: itertools.repeat(o.batch(1)),
    "penalty": lambda o: itertools.repeat(o.batch(2)),
}

META_TASKS = ("sst2", "rte", "boolq")

# page -> name -> builder, where a page's name means something else
PAGE_FIXTURES: Dict[str, Dict[str, Callable[[Objects], object]]] = {
    "docs/optimizers/meta-zofo.md": {
        "model": lambda o: o.tiny_bert_lora(),
        "loss_fn": lambda o: (lambda b: o.run.namespace["model"](**b).loss),
        "upper": lambda o: {t: itertools.repeat(o.batch(0)) for t in META_TASKS},
        "lower": lambda o: {t: itertools.repeat(o.batch(1)) for t in META_TASKS},
        "penalty": lambda o: {t: itertools.repeat(o.batch(2)) for t in META_TASKS},
    },
    "docs/optimizers/zofo.md": {
        name: (lambda o, name=name: o.cached("pair", lambda: _plain_pytorch_pair(o))[name])
        for name in ("backbone_params", "upper_params", "lower_params", "select_adapter",
                     "loss_fn")
    },
}


def _saved_run(run: "PageRun") -> None:
    """docs/saving.md reads the folder "D": a Bilevel-ZOFO run with LoRA, saved by
    zofo-train (tiny BERT, its default prompt head, one step)."""
    from zofo_kernels.apps import train
    data = "../shared/data/sst2/"
    with _threads_kept():
        _exit_ok(train.main, ["--model", "tiny-bert", "--method", "bilevel-zofo", "--peft",
                              "lora", "--train", data + "train.tsv", "--eval", data + "dev.tsv",
                              "--num-train", "24", "--batch-size", "4", "--max-length", "32",
                              "--steps", "1", "--output", "D", "--no-progress"])


# page -> what its blocks need on disk before they run
PAGE_SETUP: Dict[str, Callable[["PageRun"], None]] = {"docs/saving.md": _saved_run}


def free_names(source: str) -> set:
    """Names the code reads before it defines them (assignment targets count from the end of
    their statement, loop targets from the end of the iterable)."""
    tree = ast.parse(source)
    store_at = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    store_at[id(n)] = (node.end_lineno, node.end_col_offset)
        elif isinstance(node, (ast.For, ast.comprehension)):
            for n in ast.walk(node.target):
                store_at[id(n)] = (node.iter.end_lineno, node.iter.end_col_offset)
    events = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            where = (node.lineno, node.col_offset)
            if isinstance(node.ctx, ast.Load):
                events.append((where, 1, node.id))
            else:
                events.append((store_at.get(id(node), where), 0, node.id))
        elif isinstance(node, ast.arg):
            events.append(((node.lineno, node.col_offset), 0, node.arg))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                events.append(((node.lineno, node.col_offset), 0,
                               (a.asname or a.name).split(".")[0]))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            events.append(((node.lineno, node.col_offset), 0, node.name))
    first: Dict[str, int] = {}
    for _, kind, name in sorted(events):
        first.setdefault(name, kind)
    return {n for n, kind in first.items() if kind == 1} - set(dir(builtins))


# --------------------------------------------------------------------------- shell commands

# appended to the commands that run, so that they win over the command's own options
CAUSAL = ("gemma3-270m", "opt-125m", "opt-350m", "opt-1.3b", "tiny-opt")
TINY = {
    "zofo-train": ["--steps", "2", "--num-train", "24", "--batch-size", "4", "--max-length",
                   "32", "--eval-batch-size", "16", "--log-every", "1", "--no-progress",
                   "--threads", "1"],
    "zofo-bench": ["--models", "tiny-bert", "--repeats", "1", "--warmup", "0", "--batch-size",
                   "2", "--seq-len", "8", "--no-memory", "--no-progress", "--threads", "1"],
    "benchmarks/bench_kernels.py": ["--sizes", "1000", "--repeats", "1", "--warmup", "0",
                                    "--dtypes", "fp32", "--device", "cpu"],
    "benchmarks/plot_kernels.py": [],
    "examples/run_text_classification.py": ["--max-steps", "2", "--batch-size", "4",
                                            "--max-train-samples", "16",
                                            "--max-eval-samples", "8",
                                            "--gradient-accumulation-steps", "2",
                                            "--threads", "1"],
}


class CommandError(AssertionError):
    pass


class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once a script's arguments parsed."""


def _split_commands(text: str) -> List[tuple]:
    """(environment, argv) of every command of a shell block: continuation lines joined,
    comments dropped, ``&&`` chains split; other shell syntax is refused."""
    out = []
    for line in re.sub(r"\\\n", " ", text).split("\n"):
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        for part in (list(g) for k, g in itertools.groupby(tokens, lambda t: t == "&&")
                     if not k):
            if any(t in ("|", ";", ">", ">>", "&", "||", "<") for t in part):
                raise CommandError(f"shell syntax the docs test does not know: {line!r}")
            env = {}
            while part and re.match(r"^[A-Z_][A-Z0-9_]*=", part[0]):
                key, value = part.pop(0).split("=", 1)
                env[key] = value
            out.append((env, part))
    return out


@contextlib.contextmanager
def _argv(argv):
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _threads_kept():
    import torch
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _exit_ok(fn, *args):
    """Call ``fn``; a SystemExit other than 0 is a failure naming its message."""
    try:
        rc = fn(*args)
    except SystemExit as exc:
        rc = exc.code
    if rc not in (0, None):
        raise CommandError(f"exited with {rc!r}")


class PageRun:
    """One page: its blocks in order, in a temporary folder that is the current folder."""

    def __init__(self, page: str, workdir: Path):
        self.page = page
        self.workdir = workdir
        self.objects = Objects(self)
        self.namespace: Dict[str, object] = {}
        self.log: List[str] = []   # "line N: python run" / "line N: bash checked: ..." ...
        self._scripts: Dict[str, dict] = {}
        self._bench_ran = False

    # -- Sybil
    def document(self) -> Document:
        doc = Document.parse(str(REPO / self.page),
                             CodeBlockParser("python", self.python_block),
                             CodeBlockParser("bash", self.bash_block))
        doc.namespace = self.namespace
        return doc

    def run(self) -> List[str]:
        if self.page in PAGE_SETUP:
            PAGE_SETUP[self.page](self)
        for example in self.document():
            try:
                example.evaluate()
            except CommandError as exc:
                raise CommandError(f"{self.page}, block at line {example.line}: {exc}") from None
            except Exception as exc:
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(in the block of {self.page} at line {example.line})")
                raise
        return self.log

    # -- Python blocks
    def python_block(self, example) -> None:
        source = str(example.parsed)
        padded = "\n" * (example.line + getattr(example.parsed, "line_offset", 0)) + source
        code = compile(padded, example.path, "exec", dont_inherit=True)
        first = source.strip().split("\n", 1)[0]
        if NOT_RUN.match(first):
            scratch: Dict[str, object] = {}
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    exec(compile(ast.Module([node], []), example.path, "exec"), scratch)
            self.log.append(f"line {example.line}: python checked ({NOT_RUN.match(first)['reason']})")
            return
        fixtures = {**FIXTURES, **PAGE_FIXTURES.get(self.page, {})}
        for name in sorted(free_names(source)):
            if name not in self.namespace and name in fixtures:
                self.namespace[name] = fixtures[name](self.objects)
        exec(code, self.namespace)
        self.namespace.pop("__builtins__", None)
        self.log.append(f"line {example.line}: python run")

    # -- shell blocks
    def bash_block(self, example) -> None:
        source = str(example.parsed)
        marker = NOT_RUN.match(source.strip().split("\n", 1)[0])
        for env, argv in _split_commands(source):
            what = self.command(env, argv, run=marker is None)
            self.log.append(f"line {example.line}: bash {what}: {shlex.join(argv)[:70]}")

    def command(self, env: dict, argv: List[str], run: bool) -> str:
        prog, args = argv[0], argv[1:]
        if prog == "pip":
            self.check_pip(args)
            return "checked"
        if prog in ("python", "python3") and args[:1] == ["-m"]:
            module, args = args[1], args[2:]
            if module == "pytest":
                self.check_pytest(args)
                return "checked"
            prog = {"zofo_kernels.apps.train": "zofo-train",
                    "zofo_kernels.apps.bench": "zofo-bench"}.get(module)
            if prog is None:
                raise CommandError(f"python -m {module}: the docs test does not know it")
        if prog == "zofo-train":
            return self.zofo_train(args, run)
        if prog == "zofo-bench":
            return self.zofo_bench(args, run)
        if prog in ("python", "python3"):
            return self.script(args[0], args[1:], run)
        if prog == "torchrun":
            return self.torchrun(args, run)
        if prog == "bash":
            return self.bash_script(args, run)
        raise CommandError(f"{prog}: a command the docs test does not know (teach "
                           "python_tests/docs/docblocks.py, or mark the block)")

    @staticmethod
    def check_pip(args: List[str]) -> None:
        if args[:1] != ["install"]:
            raise CommandError(f"pip {' '.join(args)}: only pip install is expected")
        pyproject = (REPO / "pyproject.toml").read_text()
        for a in args[1:]:
            m = re.fullmatch(r"\.\[(?P<extras>[\w,-]+)\]", a)
            if m:
                for extra in m["extras"].split(","):
                    if not re.search(rf"^{re.escape(extra)} = \[", pyproject, re.M):
                        raise CommandError(f"pip install {a}: pyproject.toml has no extra "
                                           f"{extra!r}")

    @staticmethod
    def check_pytest(args: List[str]) -> None:
        it = iter(args)
        conftest = (REPO / "python_tests" / "conftest.py").read_text()
        for a in it:
            if a in ("-m", "-k"):
                expr = next(it)
                if a == "-m":
                    for word in re.findall(r"[A-Za-z_]\w*", expr):
                        if word not in ("and", "or", "not") and \
                                f'"markers", "{word}:' not in conftest:
                            raise CommandError(f"pytest -m {expr}: marker {word!r} is not "
                                               "registered in python_tests/conftest.py")
            elif not a.startswith("-") and not (REPO / a.split("::")[0]).exists():
                raise CommandError(f"pytest: {a} does not exist in the checkout")

    def zofo_train(self, args: List[str], run: bool) -> str:
        from zofo_kernels.apps import train
        try:
            train.parse(args)
        except SystemExit as exc:
            raise CommandError(f"zofo-train refuses the command as written: {exc}") from None
        if not run:
            return "checked"
        model = args[args.index("--model") + 1] if "--model" in args else "minilm"
        tiny = "tiny-opt" if model in CAUSAL else "tiny-bert"
        with _threads_kept():
            _exit_ok(train.main, args + ["--model", tiny] + TINY["zofo-train"])
        return f"run ({tiny}, 2 steps)"

    def zofo_bench(self, args: List[str], run: bool) -> str:
        from zofo_kernels.apps import bench
        try:
            parsed = bench.build_parser().parse_args(args)
        except SystemExit as exc:
            raise CommandError(f"zofo-bench refuses the command as written ({exc})") from None
        if not run:
            return "checked"
        if parsed.device.startswith("cuda"):
            raise CommandError("zofo-bench --device cuda cannot run here: mark the block")
        if self._bench_ran:   # on the tiny model, a page's zofo-bench commands are one run
            return "checked (the page's first zofo-bench ran)"
        self._bench_ran = True
        with _threads_kept():
            _exit_ok(bench.main, args + TINY["zofo-bench"])
        return "run (tiny-bert, 1 round)"

    def _script_globals(self, rel: str) -> dict:
        """The script's module namespace (run under another name than __main__: its
        definitions, not its main)."""
        if rel not in self._scripts:
            path = REPO / rel
            saved = sys.dont_write_bytecode
            sys.dont_write_bytecode = True   # no __pycache__ in the checkout
            try:
                self._scripts[rel] = runpy.run_path(str(path), run_name="zofo_docs_check")
            finally:
                sys.dont_write_bytecode = saved
        return self._scripts[rel]

    def script(self, rel: str, args: List[str], run: bool) -> str:
        if not (REPO / rel).is_file():
            raise CommandError(f"python {rel}: no such file in the checkout")
        g = self._script_globals(rel)
        if "parse_args" in g:
            try:
                g["parse_args"](args)
            except SystemExit as exc:
                raise CommandError(f"{rel} refuses {args}: exit {exc.code}") from None
        else:
            original = argparse.ArgumentParser.parse_args

            def parse_then_stop(parser, a=None, namespace=None):
                original(parser, a, namespace)
                raise _Parsed()
            argparse.ArgumentParser.parse_args = parse_then_stop
            try:
                g["main"](args)
                raise CommandError(f"{rel}: main() never parsed its arguments")
            except _Parsed:
                pass
            except SystemExit as exc:
                raise CommandError(f"{rel} refuses {args}: exit {exc.code}") from None
            finally:
                argparse.ArgumentParser.parse_args = original
        if not run:
            return "checked"
        if rel not in TINY:
            raise CommandError(f"{rel} has no tiny settings in the docs test: mark the block "
                               "or add them to TINY")
        extra = list(TINY[rel])
        if rel == "examples/run_text_classification.py":
            extra += ["--model", str(self.objects.tiny_model_folder())]
            if "--data-dir" not in args:
                extra += ["--data-dir", str(self.workdir.parent / "shared" / "data" / "sst2")]
        with _threads_kept(), _argv([rel] + args + extra):
            _exit_ok(g["main"], args + extra)
        return "run (tiny)"

    def torchrun(self, args: List[str], run: bool) -> str:
        from torch.distributed.run import get_args_parser
        ns = get_args_parser().parse_args(args)
        target, rest = ns.training_script, ns.training_script_args
        if ns.module:
            if importlib.util.find_spec(target) is None:
                raise CommandError(f"torchrun -m {target}: no such module")
            if target == "zofo_kernels.apps.train":
                self.zofo_train(rest, run=False)
            elif target == "zofo_kernels.apps.bench":
                self.zofo_bench(rest, run=False)
        elif re.fullmatch(r"my_\w+\.py", target):
            pass  # the reader's own script (the block above it)
        else:
            self.script(target, rest, run=False)
        if run:
            raise CommandError("torchrun commands are not run by the docs test (several "
                               "processes): mark the block")
        return "checked"

    def bash_script(self, args: List[str], run: bool) -> str:
        path = REPO / args[0]
        if not path.is_file():
            raise CommandError(f"bash {args[0]}: no such file in the checkout")
        res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            raise CommandError(f"bash -n {args[0]}: {res.stderr.strip()}")
        if run:
            raise CommandError(f"bash {args[0]} is not run by the docs test: mark the block")
        return "checked"
