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

Every save is crash-safe (:mod:`zofo_kernels.integrations.durable`): the new version of ``D``
is written beside it, fsynced, sealed by ``zofo_complete.json`` (size and sha256 of every file
of the parts above, written last) and swapped in by renames, so that at every instant the
old or the new checkpoint is complete. Other entries of ``D`` (a run's metrics, ``best/``, a
Trainer's ``checkpoint-N``) are carried over by hard links, never deleted; files inside the
parts that the completion record does not list (not written here) make the save refuse
unless ``overwrite=True``. Loading checks everything first (manifest, paths inside ``D``,
completion record, every tensor's name, shape and dtype) and only then touches a model.

The backbone is always written, also for PEFT runs whose backbone stayed frozen (LoRA/prompt
by Adam or ZO): the folder is then self-contained, and configuration changes made when the
model was loaded (e.g. a ``pad_token_id`` set for OPT) are kept with it. Only Bilevel-ZOFO and
full fine-tuning change the backbone, but a reference to "the pretrained model" would also
need those changes recorded, and a random-init preset has no folder to refer to at all.

Reload, exactly (bit-identical logits)::

    model, tokenizer = zofo_kernels.load_trained("D")          # eval mode, P active

or, in a process without zofo_kernels, with the plain transformers / peft calls::

    from transformers import AutoModelForSequenceClassification
    from peft import PeftModel
    model = AutoModelForSequenceClassification.from_pretrained("D/model",
                                                               trust_remote_code=True)
    model = PeftModel.from_pretrained(model, "D/adapter")      # PEFT runs: P

(prompt-based causal LMs: ``AutoModelForCausalLM``, the label words' logits at the last real
token, the ids in ``config.zofo_label_token_ids``). The encoder prompt head is a custom
architecture: its self-contained code (torch and transformers only,
:mod:`zofo_kernels.integrations.modeling_zofo_prompt`) is saved into ``D/model`` and named in
``config.json``'s ``auto_map``, so transformers runs it with ``trust_remote_code=True``.
:func:`load_trained` never runs code from a folder: it uses the package's own classes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import torch

from zofo_kernels.integrations import durable, library_warnings

MANIFEST = "zofo_checkpoint.json"
FORMAT = "zofo-trained-model"
FORMAT_VERSION = 2          # 2: sealed by durable's completion record (1: earlier saves)
BACKBONE_DIR = "model"
ADAPTER_DIR = "adapter"
RESUME_DIR = "resume"
LOWER_ADAPTER_DIR = f"{RESUME_DIR}/lower_adapter"
OPTIMIZER_FILE = f"{RESUME_DIR}/optimizer.pt"
RUN_STATE_FILE = f"{RESUME_DIR}/run_state.json"
# the top-level entries a save writes (the rest of a folder is carried over untouched)
PARTS = (MANIFEST, BACKBONE_DIR, ADAPTER_DIR, RESUME_DIR)
# the manifest's entries that name a path inside the folder
PATH_FIELDS = ("backbone", "adapter", "lower_adapter", "tokenizer", "optimizer", "run_state")
# files of the parts that folders saved before the completion record (format 1) held
_V1_NAMES = {"config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja", "tokenizer.model", "spiece.model",
             "adapter_config.json", "adapter_model.safetensors", "README.md", "optimizer.pt",
             "run_state.json", MANIFEST}

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


def _part(folder: Path, manifest: Dict[str, Any], key: str) -> Optional[Path]:
    """The path the manifest gives for ``key`` (None if none), refused unless it lies inside
    ``folder``."""
    rel = manifest.get(key)
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise CheckpointError(f"{folder / MANIFEST}: {key} = {rel!r} is not a path inside the "
                              "folder")
    path = folder / rel
    root = folder.resolve()
    if root != path.resolve() and root not in path.resolve().parents:
        raise CheckpointError(f"{folder / MANIFEST}: {key} = {rel!r} leads outside the folder")
    return path


def read_manifest(folder: PathLike, *, verify: bool = True) -> Dict[str, Any]:
    """The manifest of a trained-model folder (:data:`MANIFEST`), checked: format and
    version, every path inside the folder and, for folders sealed by a completion record,
    every file at its recorded size and sha256 (``verify=False`` skips the hashes).
    CheckpointError says what is wrong and where."""
    folder = Path(folder)
    old = folder.with_name(folder.name + durable.OLD_TAG)
    if not folder.exists() and old.is_dir():
        durable.recover(folder)  # a save was killed between its two renames
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
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        version = int(manifest.get("version", 0))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r} is not one this zofo_kernels reads "
                              f"({FORMAT!r} 1 to {FORMAT_VERSION})")
    for key in PATH_FIELDS:
        _part(folder, manifest, key)
    if version >= 2 or (folder / durable.COMPLETE).exists():
        try:
            durable.check_complete(folder, hashes=verify)
        except durable.IncompleteFolderError as exc:
            raise CheckpointError(f"{exc}; it cannot be loaded") from None
    return manifest


def foreign_files(folder: PathLike) -> List[str]:
    """The files inside the parts of ``folder`` (:data:`PARTS`) that this package did not
    write: not listed in its completion record (folders of format 1, which have none: not a
    name such a save writes). A save refuses to replace them unless ``overwrite=True``."""
    folder = Path(folder)
    try:
        ours = set(durable.recorded_files(folder))
    except durable.IncompleteFolderError:
        ours = None
    out = []
    for part in PARTS:
        entry = folder / part
        files = [entry] if entry.is_file() else (
            sorted(p for p in entry.rglob("*") if not p.is_dir()) if entry.is_dir() else [])
        for path in files:
            rel = path.relative_to(folder).as_posix()
            if ours is not None and rel in ours or rel == MANIFEST and ours is not None:
                continue
            if ours is None and path.name in _V1_NAMES and (folder / MANIFEST).is_file():
                continue
            out.append(rel)
    return out


def _save_adapter(model, adapter: str, target: Path, base_model: Optional[str],
                  final_base: Optional[str] = None) -> None:
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
        if final_base is not None:  # saved beside the backbone it will sit next to
            config_file = src / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = final_base
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(src), str(target))
    finally:
        cfg.base_model_name_or_path = previous
        shutil.rmtree(tmp, ignore_errors=True)


def _save_adapters(model, folder: Path, lower_adapter: Optional[str],
                   final: Optional[Path] = None) -> Dict[str, Any]:
    """Write a PeftModel's active adapter P to ``adapter/`` and, if named, the lower adapter S
    to ``resume/lower_adapter/``; returns their manifest entries."""
    upper = model.active_adapter
    if not isinstance(upper, str):
        raise ValueError("the PEFT model must have exactly one active adapter (P)")
    # AutoPeftModel*.from_pretrained(adapter/) loads the backbone from here
    base_ref = str((folder / BACKBONE_DIR).resolve())
    final_ref = str(((final or folder) / BACKBONE_DIR).resolve())
    _save_adapter(model, upper, folder / ADAPTER_DIR, base_ref, final_ref)
    entries = dict(adapter=ADAPTER_DIR, adapter_name=upper,
                   peft_type=str(model.peft_config[upper].peft_type.value))
    if lower_adapter is not None:
        (folder / RESUME_DIR).mkdir(exist_ok=True)
        _save_adapter(model, lower_adapter, folder / LOWER_ADAPTER_DIR, base_ref, final_ref)
        entries.update(lower_adapter=LOWER_ADAPTER_DIR, lower_adapter_name=lower_adapter)
    return entries


def _dtype_name(model) -> str:
    for p in _backbone_module(model).parameters():
        return str(p.dtype).replace("torch.", "")
    return "float32"


# --------------------------------------------------------------------------- saving

def save_trained(folder: PathLike, model, *, tokenizer=None, method: Optional[str] = None,
                 lower_adapter: Optional[str] = None,
                 optimizer_state: Optional[Dict[str, Any]] = None,
                 run_state: Optional[Dict[str, Any]] = None,
                 metadata: Optional[Dict[str, Any]] = None,
                 overwrite: bool = False) -> List[Path]:
    """Write ``model`` (a transformers model or a ``peft.PeftModel``) to ``folder`` in the
    layout of the module docstring, crash-safe; returns the files written.

    ``lower_adapter``: name of Bilevel-ZOFO's lower adapter S, written to
    ``resume/lower_adapter/``; the active adapter is the prediction adapter P.
    ``optimizer_state`` is ``torch.save``-d to ``resume/optimizer.pt`` and ``run_state`` (JSON)
    to ``resume/run_state.json``. ``metadata`` goes into the manifest. The new version is
    written beside ``folder`` and swapped in whole (:func:`durable.replace_folder`); the
    folder's other entries are carried over. A file inside the parts that this package did not
    write (:func:`foreign_files`) makes the save refuse (CheckpointError naming it) unless
    ``overwrite=True``, which replaces the whole folder.
    """
    model = _unwrap(model)
    folder = Path(folder)
    if folder.name in ("", ".", "..") or folder.resolve() == Path.cwd().resolve():
        raise CheckpointError(f"cannot save into {folder} (the current folder or one above "
                              "it is replaced whole by a save): give a subfolder")
    peft = is_peft_model(model)
    if lower_adapter is not None and not (peft and lower_adapter in model.peft_config):
        raise ValueError(f"lower_adapter {lower_adapter!r} is not an adapter of the model")
    durable.recover(folder)
    if folder.exists() and not overwrite:
        if not folder.is_dir():
            raise CheckpointError(f"{folder} exists and is not a folder")
        foreign = foreign_files(folder)
        if foreign:
            raise CheckpointError(
                f"{folder} holds {foreign[0]}, which zofo_kernels did not write (saving would "
                f"replace it): choose another folder, or pass overwrite=True")
    recorded = lambda rel: rel.split("/")[0] in PARTS  # noqa: E731
    with durable.replace_folder(folder, recorded=recorded) as tmp:
        manifest = _write_parts(tmp, folder, model, tokenizer, method, lower_adapter,
                                optimizer_state, run_state)
        if metadata:
            manifest["metadata"] = metadata
        if folder.is_dir() and not overwrite:
            durable.link_tree(folder, tmp, skip=PARTS + (durable.COMPLETE,))
        with open(tmp / MANIFEST, "w") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
    return [folder / rel for rel in sorted(durable.recorded_files(folder))]


def _write_parts(tmp: Path, folder: Path, model, tokenizer, method, lower_adapter,
                 optimizer_state, run_state) -> Dict[str, Any]:
    """The parts of a save into the temporary folder ``tmp`` (that becomes ``folder``);
    returns the manifest."""
    backbone = _backbone_module(model)
    manifest: Dict[str, Any] = dict(
        format=FORMAT, version=FORMAT_VERSION, method=method,
        model_class=type(backbone).__name__, dtype=_dtype_name(model),
        num_labels=getattr(getattr(backbone, "config", None), "num_labels", None),
        backbone=BACKBONE_DIR, adapter=None, adapter_name=None,
        peft_type=None, lower_adapter=None, lower_adapter_name=None, tokenizer=None,
        optimizer=None, run_state=None)
    out = tmp / BACKBONE_DIR
    backbone.save_pretrained(str(out), state_dict=backbone_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        manifest["tokenizer"] = BACKBONE_DIR
    durable.crash_point("save:backbone")
    if is_peft_model(model):
        manifest.update(_save_adapters(model, tmp, lower_adapter, folder))
    durable.crash_point("save:adapters")
    if optimizer_state is not None:
        (tmp / RESUME_DIR).mkdir(exist_ok=True)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        manifest["optimizer"] = OPTIMIZER_FILE
    if run_state is not None:
        (tmp / RESUME_DIR).mkdir(exist_ok=True)
        (tmp / RUN_STATE_FILE).write_text(json.dumps(run_state, indent=1) + "\n")
        manifest["run_state"] = RUN_STATE_FILE
    durable.crash_point("save:resume")
    return manifest


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
    source = _part(folder, manifest, "backbone") or folder / BACKBONE_DIR
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
    hf_logging.set_verbosity_error()  # the report below replaces transformers' warnings
    try:
        model, info = cls.from_pretrained(str(source), dtype=name, trust_remote_code=False,
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: the backbone cannot be loaded "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys",
                                                       "mismatched_keys")}
    if any(problems.values()):
        raise CheckpointError(f"{source} does not match its model class "
                              f"{type(model).__name__}: " + "; ".join(
                                  f"{k.replace('_', ' ')} {[str(x) for x in v[:5]]}"
                                  for k, v in problems.items() if v))
    return model.to(device)


def load_trained(folder: PathLike, *, device: Union[str, torch.device] = "cpu",
                 dtype: Optional[str] = None, with_lower: bool = False) -> TrainedModel:
    """Reload what :func:`save_trained` wrote: ``(model, tokenizer)``.

    The model is the trained one, bit for bit, in eval mode: the backbone from ``model/``
    and, for PEFT runs, a ``peft.PeftModel`` with the prediction adapter P active.
    ``with_lower=True`` also loads Bilevel-ZOFO's lower adapter S (inactive). ``tokenizer`` is
    None when none was saved. ``dtype`` overrides the saved dtype. The folder is checked as
    :func:`load_weights_into` checks it (the same rules): a missing, extra or wrong-shaped
    tensor, a damaged file or a path outside the folder raises CheckpointError; no weight is
    ever left at a random initialisation."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = _load_backbone(folder, manifest, device, dtype)
    if manifest.get("adapter"):
        from peft import PeftModel
        name = manifest.get("adapter_name") or "default"
        if with_lower and not manifest.get("lower_adapter"):
            raise CheckpointError(f"{folder} holds no lower adapter (not a Bilevel-ZOFO run)")
        try:
            with library_warnings.peft_wrapping():
                model = PeftModel.from_pretrained(
                    model, str(_part(folder, manifest, "adapter")), adapter_name=name)
            if with_lower:
                model.load_adapter(str(_part(folder, manifest, "lower_adapter")),
                                   adapter_name=manifest["lower_adapter_name"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{folder}: the adapter cannot be loaded ({exc})") from None
        model.set_adapter(name)
    # what load_weights_into would copy must match what was loaded (names, shapes, dtypes)
    _plan(model, folder, manifest, lower=with_lower, dtypes=dtype is None)
    model.eval()
    tokenizer = None
    if manifest.get("tokenizer"):
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(_part(folder, manifest, "tokenizer")),
                                                      trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: the tokenizer cannot be loaded ({exc})") from None
    return TrainedModel(model, tokenizer)


def _read_safetensors(folder: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` folder (one file, or shards with an index)."""
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{folder} has no model.safetensors")
        out: Dict[str, torch.Tensor] = {}
        for name in files:
            if Path(name).name != name:
                raise CheckpointError(f"{index}: shard {name!r} is not a file of {folder}")
            out.update(load_file(str(folder / name)))
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{folder}: the weights cannot be read ({exc})") from None
    return out


def _compare(where: Path, expected: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
             optional=(), dtypes: bool = True) -> None:
    """CheckpointError naming ``where`` unless ``saved`` has exactly ``expected``'s names
    (but those in ``optional``), each with its shape and dtype."""
    missing = sorted(k for k in expected if k not in saved and k not in optional)
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where} does not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for key, tensor in saved.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or (dtypes and tensor.dtype != want.dtype):
            raise CheckpointError(
                f"{where}: {key} is {tensor.dtype} {list(tensor.shape)}, the model's "
                f"{want.dtype} {list(want.shape)}")


def _plan(model, folder: Path, manifest: Dict[str, Any], *, lower: bool = True,
          dtypes: bool = True) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]],
                                        List[Tuple[str, Dict[str, torch.Tensor]]]]:
    """Read and check everything :func:`load_weights_into` copies, touching nothing:
    ([(the model's tensor, the saved one)] of the backbone, [(adapter name, its saved
    weights)]). CheckpointError on the first problem."""
    peft = is_peft_model(model)
    if bool(manifest.get("adapter")) != peft:
        raise CheckpointError(
            f"{folder} holds a {'PEFT' if manifest.get('adapter') else 'plain'} model but the "
            f"model to load it into is {'a PEFT' if peft else 'a plain'} model")
    backbone_dir = _part(folder, manifest, "backbone") or folder / BACKBONE_DIR
    saved = _read_safetensors(backbone_dir)
    own = _backbone_module(model).state_dict()
    targets = {key: clean for key, clean in _backbone_name_map(model).items()
               if clean is not None}
    present_ptrs = {own[k].data_ptr() for k, c in targets.items() if c in saved}
    # save_pretrained drops tied copies (e.g. an LM head tied to the embeddings)
    tied = {c for k, c in targets.items() if c not in saved and own[k].data_ptr() in present_ptrs}
    _compare(backbone_dir, {c: own[k] for k, c in targets.items()}, saved, tied, dtypes)
    copies = [(own[key], saved[clean]) for key, clean in targets.items() if clean in saved]
    adapters = []
    if peft:
        from peft import get_peft_model_state_dict
        from peft.utils import load_peft_weights
        pairs = [("adapter", model.active_adapter)]
        if manifest.get("lower_adapter") and lower:
            name = manifest.get("lower_adapter_name")
            if name not in model.peft_config:
                raise CheckpointError(f"{folder} holds a lower adapter {name!r} that the model "
                                      "lacks")
            pairs.append(("lower_adapter", name))
        for key, name in pairs:
            sub = _part(folder, manifest, key)
            try:
                weights = load_peft_weights(str(sub), device="cpu")
            except Exception as exc:  # safetensors / OSError
                raise CheckpointError(f"{sub}: the adapter weights cannot be read ({exc})"
                                      ) from None
            _compare(sub, get_peft_model_state_dict(model, adapter_name=name), weights,
                     dtypes=dtypes)
            adapters.append((name, weights))
    return copies, adapters


def load_weights_into(model, folder: PathLike) -> Dict[str, Any]:
    """Copy the weights saved in ``folder`` into ``model`` in place (resuming): the backbone,
    P into the active adapter and S into the lower adapter named in the manifest. The model
    must have the saved structure (same architecture and adapters). Everything is read and
    checked first (the manifest, the completion record, every tensor's name, shape and
    dtype); on any problem CheckpointError names the file and the model is left exactly as
    it was. Returns the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = _unwrap(model)
    copies, adapters = _plan(model, folder, manifest)
    with torch.no_grad():
        for own, saved in copies:
            own.copy_(saved)
    if adapters:
        from peft import set_peft_model_state_dict
        for name, weights in adapters:
            set_peft_model_state_dict(model, weights, adapter_name=name)
    return manifest
