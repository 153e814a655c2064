"""The package's shape, checked on its source: three layers that import only downward, units
of a readable size, no private names reached across modules, and a core that runs with
torch and numpy alone."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zofo_kernels

PKG = Path(zofo_kernels.__file__).resolve().parent
# a layer may import from itself and from the layers after it in this list
LAYERS = ("apps", "integrations", "core")
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60
MAX_PUBLIC_POSITIONAL = 8


def _sources():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module, imported names) of every import in ``tree``, function-level
    ones included, relative imports resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base, tuple(a.name for a in node.names)


def test_every_module_belongs_to_a_layer():
    loose = [_module_name(p) for p in _sources()
             if _layer(_module_name(p)) is None and p.name != "__init__.py"]
    assert loose == [], f"modules outside core/, integrations/ and apps/: {loose}"


def test_layers_import_only_downward():
    bad = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        tree = ast.parse(path.read_text(), str(path))
        for line, target, names in _imports(tree, module, path.name == "__init__.py"):
            targets = [target] + [f"{target}.{n}" for n in names]
            for t in targets:
                other = _layer(t) if t.startswith("zofo_kernels.") else None
                if other is None:
                    continue
                if own is None:  # the top-level package: re-exports the layers' public names
                    continue
                if LAYERS.index(other) < LAYERS.index(own):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} ({own}) imports {t} "
                               f"({other})")
    assert bad == [], "imports from a layer above:\n" + "\n".join(bad)


def test_the_top_level_package_imports_no_integration_eagerly():
    """``import zofo_kernels`` loads the core only; integration names resolve on first use."""
    tree = ast.parse((PKG / "__init__.py").read_text())
    eager = [t for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             for _, t, _ in _imports(ast.Module(body=[node], type_ignores=[]), "zofo_kernels",
                                     True)
             if _layer(t) in ("integrations", "apps")]
    assert eager == []


def test_no_private_name_is_imported_across_modules():
    bad = []
    for path in _sources():
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for line, target, names in _imports(tree, module, path.name == "__init__.py"):
            if not target.startswith("zofo_kernels"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            if private:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {private} from "
                           f"{target}")
    assert bad == [], "\n".join(bad)


def _positional(fn: ast.AST) -> int:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)


def test_units_stay_small():
    too_big = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(PKG.parent)
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                too_big.append(f"{where}:{node.lineno} class {node.name}: {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if size > MAX_FUNCTION_LINES:
                    too_big.append(f"{where}:{node.lineno} {node.name}(): {size} lines")
                if not node.name.startswith("_") and _positional(node) > MAX_PUBLIC_POSITIONAL:
                    too_big.append(f"{where}:{node.lineno} {node.name}(): "
                                   f"{_positional(node)} positional parameters")
    assert too_big == [], "\n".join(too_big)


def test_one_definition_of_each_shared_validator():
    defs = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.col_offset == 0:
                defs.setdefault(node.name, []).append(str(path.relative_to(PKG.parent)))
    repeated = {n: w for n, w in defs.items() if len(w) > 1 and n.lstrip("_") in (
        "real", "int", "choice", "finite_real", "positive_int")}
    assert repeated == {}


# The core needs torch and numpy only: with every optional dependency made unimportable, the
# package imports, a ZOOptimizer step runs and perturb_ works; an integration name says which
# extra it needs.
_CORE_ONLY = r"""
import sys
BLOCKED = ("transformers", "peft", "accelerate", "tqdm", "matplotlib", "safetensors")
for name in BLOCKED:  # None in sys.modules: `import` fails and find_spec says "absent"
    sys.modules[name] = None
import torch, zofo_kernels
from zofo_kernels import ZOOptimizer, perturb_, noise
model = torch.nn.Linear(7, 3)
opt = ZOOptimizer(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
x, y = torch.randn(5, 7), torch.randn(5, 3)
before = model.weight.detach().clone()
loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
assert torch.isfinite(torch.as_tensor(loss)), loss
assert not torch.equal(before, model.weight), "the step did not move the weights"
t = torch.zeros(11)
perturb_([t], seed=3, scale=0.5)
assert torch.equal(t, 0.5 * noise(3, 0, 11)), "perturb_ disagrees with noise"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m])
assert loaded == [], loaded
try:
    zofo_kernels.load_trained
except ImportError as exc:
    assert "[hf]" in str(exc), exc
    print("integration:", exc)
else:
    raise AssertionError("load_trained resolved without transformers")
print("core ok")
"""


def test_the_core_runs_with_torch_and_numpy_alone(tmp_path):
    out = subprocess.run([sys.executable, "-c", _CORE_ONLY], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "core ok" in out.stdout
