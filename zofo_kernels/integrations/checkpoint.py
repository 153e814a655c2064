"""Saving and reloading trained models: one folder layout for ``zofo-train`` and ``ZOFOTrainer``.

A trained-model folder ``D`` holds::

    D/zofo_checkpoint.json     manifest: format version, method, what lies where (below)
    D/model/                   the backbone: a normal ``save_pretrained`` checkpoint
                               (config.json, model.safetensors) and the tokenizer files
    D/adapter/                 PEFT runs: the prediction adapter (Bilevel-ZOFO's upper copy P),
                               a normal peft adapter folder (adapter_config.json,
                               adapter_model.safetensors)
    D/resume/lower_adapter/    Bilevel-ZOFO: the lower copy S, a peft adapter folder
    D/resume/optimizer.pt      zofo-train: optimizer state (ZO seed counter and settings, Adam
                               states of P / S or of the trained weights, counters)
    D/resume/run_state.json    zofo-train: arguments, step counters, data stream positions,
                               time-budget accounting (what ``zofo-train --resume D`` reads)

The backbone is always written, also for PEFT runs whose backbone stayed frozen (LoRA/prompt
by Adam or ZO): the folder is then self-contained, and configuration changes made when the
model was loaded (e.g. a ``pad_token_id`` set for OPT) are kept with it. Only Bilevel-ZOFO and
full fine-tuning change the backbone, but a reference to "the pretrained model" would also
need those changes recorded, and a random-init preset has no folder to refer to at all.

Reload, exactly (bit-identical logits)::

    model, tokenizer = zofo_kernels.load_trained("D")          # eval mode, P active

or with the plain transformers / peft calls::

    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel
    model = AutoModelForSequenceClassification.from_pretrained("D/model")
    model = PeftModel.from_pretrained(model, "D/adapter")      # PEFT runs: P
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch

MANIFEST = "zofo_checkpoint.json"
FORMAT = "zofo-trained-model"
FORMAT_VERSION = 1
BACKBONE_DIR = "model"
ADAPTER_DIR = "adapter"
RESUME_DIR = "resume"
LOWER_ADAPTER_DIR = f"{RESUME_DIR}/lower_adapter"
OPTIMIZER_FILE = f"{RESUME_DIR}/optimizer.pt"
RUN_STATE_FILE = f"{RESUME_DIR}/run_state.json"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A folder is not a trained-model folder, or does not match the model; says why."""


class TrainedModel(NamedTuple):
    """What :func:`load_trained` returns: ``model, tokenizer = load_trained(folder)``."""
    model: torch.nn.Module
    tokenizer: Optional[Any]


# --------------------------------------------------------------------------- helpers

def is_peft_model(model) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict) and hasattr(model, "set_adapter")


def _unwrap(model):
    """The model itself under DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not (
            hasattr(model, "config") or is_peft_model(model)):
        model = model.module
    return model


def _backbone_name_map(model) -> Dict[str, Optional[str]]:
    """{name in ``model.state_dict()``: the backbone's own transformers name, or None for
    adapter tensors}. peft inserts ``base_layer`` (LoRA-wrapped layers) and
    ``original_module`` / ``modules_to_save.<adapter>`` (per-adapter copies such as a
    classification head); the backbone is the ``original_module`` copy."""
    if not is_peft_model(model):
        return {k: k for k in model.state_dict()}
    adapters = set(model.peft_config)
    base = model.get_base_model()
    out = {}
    for key in base.state_dict():
        parts = key.split(".")
        if set(parts) & adapters:
            out[key] = None
        else:
            out[key] = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
    return out


def _backbone_module(model):
    return model.get_base_model() if is_peft_model(model) else model


def backbone_state_dict(model) -> Dict[str, torch.Tensor]:
    """The backbone's tensors under its plain transformers names (no adapter tensors)."""
    model = _unwrap(model)
    sd = _backbone_module(model).state_dict()
    return {clean: sd[key] for key, clean in _backbone_name_map(model).items()
            if clean is not None}


def read_manifest(folder: PathLike) -> Dict[str, Any]:
    """The manifest of a trained-model folder (:data:`MANIFEST`); CheckpointError if absent."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    if not path.is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
            hint = (" (it looks like a plain transformers/peft folder: load it with "
                    "from_pretrained instead)")
        raise CheckpointError(f"{folder} has no {MANIFEST}: not a folder written by "
                              f"zofo_kernels.save_trained{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r} is not one this zofo_kernels reads "
                              f"({FORMAT!r} <= {FORMAT_VERSION})")
    return manifest


def _save_adapter(model, adapter: str, target: Path, base_model: Optional[str]) -> None:
    """Write one adapter of a PeftModel as a plain peft folder at ``target`` (peft puts a
    non-default adapter in a subfolder named after it; the folder here is always flat)."""
    cfg = model.peft_config[adapter]
    previous = cfg.base_model_name_or_path
    if base_model is not None:
        cfg.base_model_name_or_path = base_model
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=[adapter])
        src = tmp if adapter == "default" else tmp / adapter
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(src), str(target))
    finally:
        cfg.base_model_name_or_path = previous
        shutil.rmtree(tmp, ignore_errors=True)


def _save_adapters(model, folder: Path, lower_adapter: Optional[str]) -> Dict[str, Any]:
    """Write a PeftModel's active adapter P to ``adapter/`` and, if named, the lower adapter S
    to ``resume/lower_adapter/``; returns their manifest entries."""
    upper = model.active_adapter
    if not isinstance(upper, str):
        raise ValueError("the PEFT model must have exactly one active adapter (P)")
    # AutoPeftModel*.from_pretrained(adapter/) loads the backbone from here
    base_ref = str((folder / BACKBONE_DIR).resolve())
    _save_adapter(model, upper, folder / ADAPTER_DIR, base_ref)
    entries = dict(adapter=ADAPTER_DIR, adapter_name=upper,
                   peft_type=str(model.peft_config[upper].peft_type.value))
    if lower_adapter is not None:
        (folder / RESUME_DIR).mkdir(exist_ok=True)
        _save_adapter(model, lower_adapter, folder / LOWER_ADAPTER_DIR, base_ref)
        entries.update(lower_adapter=LOWER_ADAPTER_DIR, lower_adapter_name=lower_adapter)
    return entries


def _dtype_name(model) -> str:
    for p in _backbone_module(model).parameters():
        return str(p.dtype).replace("torch.", "")
    return "float32"


def _files_under(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- saving

def save_trained(folder: PathLike, model, *, tokenizer=None, method: Optional[str] = None,
                 lower_adapter: Optional[str] = None,
                 optimizer_state: Optional[Dict[str, Any]] = None,
                 run_state: Optional[Dict[str, Any]] = None,
                 metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write ``model`` (a transformers model or a ``peft.PeftModel``) to ``folder`` in the
    layout of the module docstring; returns the files written.

    ``lower_adapter``: name of Bilevel-ZOFO's lower adapter S, written to
    ``resume/lower_adapter/``; the active adapter is the prediction adapter P.
    ``optimizer_state`` is ``torch.save``-d to ``resume/optimizer.pt`` and ``run_state`` (JSON)
    to ``resume/run_state.json``. ``metadata`` goes into the manifest. Writing into an existing
    folder replaces the parts written here and leaves other files alone.
    """
    model = _unwrap(model)
    folder = Path(folder)
    peft = is_peft_model(model)
    if lower_adapter is not None and not (peft and lower_adapter in model.peft_config):
        raise ValueError(f"lower_adapter {lower_adapter!r} is not an adapter of the model")
    folder.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in _files_under(folder)}
    backbone = _backbone_module(model)
    manifest: Dict[str, Any] = dict(
        format=FORMAT, version=FORMAT_VERSION, method=method,
        model_class=type(backbone).__name__, dtype=_dtype_name(model),
        num_labels=getattr(getattr(backbone, "config", None), "num_labels", None),
        backbone=BACKBONE_DIR, adapter=None, adapter_name=None,
        peft_type=None, lower_adapter=None, lower_adapter_name=None, tokenizer=None,
        optimizer=None, run_state=None)
    out = folder / BACKBONE_DIR
    if out.exists():
        shutil.rmtree(out)
    backbone.save_pretrained(str(out), state_dict=backbone_state_dict(model))
    if peft:
        manifest.update(_save_adapters(model, folder, lower_adapter))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        manifest["tokenizer"] = BACKBONE_DIR
    if optimizer_state is not None:
        (folder / RESUME_DIR).mkdir(exist_ok=True)
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)
        manifest["optimizer"] = OPTIMIZER_FILE
    if run_state is not None:
        (folder / RESUME_DIR).mkdir(exist_ok=True)
        (folder / RUN_STATE_FILE).write_text(json.dumps(run_state, indent=1) + "\n")
        manifest["run_state"] = RUN_STATE_FILE
    if metadata:
        manifest["metadata"] = metadata
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return [p for p in _files_under(folder)
            if p not in before or p.stat().st_mtime_ns != before[p]]


# --------------------------------------------------------------------------- loading

def _load_backbone(folder: Path, manifest: Dict[str, Any], device, dtype):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    from zofo_kernels.integrations.hf_models import DTYPES
    name = manifest.get("dtype") if dtype is None else dtype
    if isinstance(name, str):
        if name not in DTYPES:
            raise CheckpointError(f"unknown dtype {name!r} in {folder / MANIFEST}")
        name = DTYPES[name]
    source = folder / (manifest.get("backbone") or BACKBONE_DIR)
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source} has no config.json: the backbone is missing")
    import transformers

    # (prompting registers BertPromptClassifier with the Auto classes)
    from zofo_kernels.integrations import prompting
    cls = getattr(transformers, str(manifest.get("model_class")), None)
    if manifest.get("model_class") == prompting.BertPromptClassifier.__name__:
        cls = prompting.BertPromptClassifier
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = AutoModelForSequenceClassification
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = cls.from_pretrained(str(source), dtype=name)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device)


def load_trained(folder: PathLike, *, device: Union[str, torch.device] = "cpu",
                 dtype: Optional[str] = None, with_lower: bool = False) -> TrainedModel:
    """Reload what :func:`save_trained` wrote: ``(model, tokenizer)``.

    The model is the trained one, bit for bit, in eval mode: the backbone from ``model/``
    and, for PEFT runs, a ``peft.PeftModel`` with the prediction adapter P active.
    ``with_lower=True`` also loads Bilevel-ZOFO's lower adapter S (inactive). ``tokenizer`` is
    None when none was saved. ``dtype`` overrides the saved dtype."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = _load_backbone(folder, manifest, device, dtype)
    if manifest.get("adapter"):
        from peft import PeftModel
        name = manifest.get("adapter_name") or "default"
        model = PeftModel.from_pretrained(model, str(folder / manifest["adapter"]),
                                          adapter_name=name)
        if with_lower:
            if not manifest.get("lower_adapter"):
                raise CheckpointError(f"{folder} holds no lower adapter (not a Bilevel-ZOFO run)")
            model.load_adapter(str(folder / manifest["lower_adapter"]),
                               adapter_name=manifest["lower_adapter_name"])
        model.set_adapter(name)
    model.eval()
    tokenizer = None
    if manifest.get("tokenizer"):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(folder / manifest["tokenizer"]))
    return TrainedModel(model, tokenizer)


def _read_safetensors(folder: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` folder (one file, or shards with an index)."""
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} has no model.safetensors")
    out: Dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


def load_weights_into(model, folder: PathLike) -> Dict[str, Any]:
    """Copy the weights saved in ``folder`` into ``model`` in place (resuming): the backbone,
    P into the active adapter and S into the lower adapter named in the manifest. The model
    must have the saved structure (same architecture and adapters); a tensor missing from the
    files, or one the model lacks, raises CheckpointError. Returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = _unwrap(model)
    peft = is_peft_model(model)
    if bool(manifest.get("adapter")) != peft:
        raise CheckpointError(
            f"{folder} holds a {'PEFT' if manifest.get('adapter') else 'plain'} model but the "
            f"model to load it into is {'a PEFT' if peft else 'a plain'} model")
    backbone_dir = folder / (manifest.get("backbone") or BACKBONE_DIR)
    saved = _read_safetensors(backbone_dir)
    own = _backbone_module(model).state_dict()
    targets = {key: clean for key, clean in _backbone_name_map(model).items()
               if clean is not None}
    present_ptrs = {own[k].data_ptr() for k, c in targets.items() if c in saved}
    # save_pretrained drops tied copies (e.g. an LM head tied to the embeddings)
    missing = sorted(c for k, c in targets.items()
                     if c not in saved and own[k].data_ptr() not in present_ptrs)
    extra = sorted(set(saved) - set(targets.values()))
    if missing or extra:
        raise CheckpointError(f"{backbone_dir} does not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    with torch.no_grad():
        for key, clean in targets.items():
            if clean in saved:
                own[key].copy_(saved[clean])
    if peft:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from peft.utils import load_peft_weights
        pairs = [(manifest["adapter"], model.active_adapter)]
        if manifest.get("lower_adapter"):
            lower = manifest["lower_adapter_name"]
            if lower not in model.peft_config:
                raise CheckpointError(f"{folder} holds a lower adapter {lower!r} that the model "
                                      "lacks")
            pairs.append((manifest["lower_adapter"], lower))
        for sub, name in pairs:
            weights = load_peft_weights(str(folder / sub), device="cpu")
            expected = get_peft_model_state_dict(model, adapter_name=name)
            if set(weights) != set(expected):
                raise CheckpointError(
                    f"{folder / sub} does not match adapter {name!r}: missing "
                    f"{sorted(set(expected) - set(weights))[:5]}, unexpected "
                    f"{sorted(set(weights) - set(expected))[:5]}")
            set_peft_model_state_dict(model, weights, adapter_name=name)
    return manifest
