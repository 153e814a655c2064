"""CI (packaging stage): the core of an installed zofo_kernels runs with torch and numpy only.

Run with the Python of an environment where `pip install .` put the package and nothing else
(no extra): it checks that none of the extras' packages is installed, that `import
zofo_kernels`, a ZOOptimizer step and perturb_ work, and that the integrations and applications
refuse to import with an error naming their extra.
"""

import importlib
import importlib.util
import sys

import torch

EXTRA_PACKAGES = ("transformers", "peft", "accelerate", "tqdm", "matplotlib")
present = [m for m in EXTRA_PACKAGES if importlib.util.find_spec(m) is not None]
assert present == [], f"the core install pulled in extras' packages: {present}"

import zofo_kernels  # noqa: E402
from zofo_kernels import ZOOptimizer, noise, perturb_  # noqa: E402

torch.manual_seed(0)
model = torch.nn.Linear(16, 4)
x, y = torch.randn(8, 16), torch.randn(8, 4)
opt = ZOOptimizer(model.parameters(), lr=1e-2, eps=1e-3, seed=0)
before = model.weight.detach().clone()
loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
assert torch.isfinite(torch.as_tensor(loss)), loss
assert not torch.equal(before, model.weight), "the ZO step left the weights unchanged"

t = torch.zeros(37)
perturb_([t], seed=5, scale=0.25)
assert torch.equal(t, 0.25 * noise(5, 0, 37)), "perturb_ disagrees with noise"

for module, extra in (("zofo_kernels.integrations.checkpoint", "hf"),
                      ("zofo_kernels.apps.train", "apps")):
    try:
        importlib.import_module(module)
    except ImportError as exc:
        assert f"[{extra}]" in str(exc), exc
        print(f"   {module}: {exc}")
    else:
        raise AssertionError(f"{module} imported without its extra [{extra}]")
try:
    zofo_kernels.load_trained
except ImportError as exc:
    assert "[hf]" in str(exc), exc
else:
    raise AssertionError("zofo_kernels.load_trained resolved without the [hf] extra")
print(f"   core ok: {zofo_kernels.__file__}, cpu backend: "
      f"{zofo_kernels.available_backends()['cpu'].reason}")
sys.exit(0)
