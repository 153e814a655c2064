"""Small facts about Hugging Face models shared by the integrations (saving, the Trainer) and
the applications: the dtype names the package accepts, and whether a model takes
``past_key_values`` (what peft's prefix tuning needs)."""

import inspect

import torch

# dtype names accepted by saving/reloading, zofo-train and zofo-bench (the kernels' dtypes)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def accepts_past_key_values(model: torch.nn.Module) -> bool:
    """What peft checks before a prefix-tuning forward: the model, or its transformer
    backbone, takes ``past_key_values``."""
    from transformers import PreTrainedModel

    def accepts(m):
        return "past_key_values" in inspect.signature(m.forward).parameters

    return accepts(model) or any(accepts(c) for c in model.children()
                                 if isinstance(c, PreTrainedModel))
