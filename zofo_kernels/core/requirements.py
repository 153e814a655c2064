"""Which optional extra provides which dependency, and the error that names the extra.

The core needs torch and numpy only. The other layers need extras of the package:
``pip install "zofo_kernels[hf]"`` (transformers, peft, accelerate, safetensors) for the
integrations and ``pip install "zofo_kernels[apps]"`` (the [hf] extra plus tqdm and
matplotlib) for the command-line applications.
"""

import importlib.util

EXTRAS = {
    "hf": ("transformers", "peft", "accelerate", "safetensors"),
    "apps": ("transformers", "peft", "accelerate", "safetensors", "tqdm", "matplotlib"),
}


class MissingExtraError(ImportError):
    """An optional dependency of the package is not installed; the message names the extra
    that installs it."""


def missing(extra: str):
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


def require_extra(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` if any of its modules is missing."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{what} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} "
            f"not installed: pip install \"zofo_kernels[{extra}]\" (or from a checkout: "
            f"pip install -e \".[{extra}]\")")
