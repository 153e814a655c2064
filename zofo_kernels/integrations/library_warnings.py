"""Two deprecation notices that peft triggers inside transformers, silenced only around the
calls that trigger them.

Both come from peft 0.21 calling transformers 5 the way transformers has deprecated; neither
comes from anything this package or its user passes, both are harmless, and nobody but peft
can act on them:

* ``FutureWarning: `is_gradient_checkpointing` is deprecated ...``: ``peft.PeftModel``'s
  constructor (``get_peft_model``, ``PeftModel.from_pretrained``) reads
  ``model.is_gradient_checkpointing``, transformers' deprecated alias of
  ``is_activation_checkpointing``. Silence it around a call with :func:`peft_wrapping`.
* ``FutureWarning: `past_key_values` is deprecated and will be removed in version ... for
  `...ForCausalLM.forward```: peft's prefix tuning on a causal LM hands the prefix to the
  model's forward as ``past_key_values``. Silence it around a forward with
  :func:`forward_of`, which does nothing for a model without a prefix-tuning adapter.

Each filter matches one category and one message, inside ``warnings.catch_warnings``, so it
lives only for the call it wraps; no filter is installed process-wide and every other
warning is shown as before.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

# name -> (category, regular expression of the message's start)
KNOWN = {
    "is_gradient_checkpointing": (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    "past_key_values": (FutureWarning, r"`past_key_values` is deprecated and will be removed "
                                       r"in version [0-9.]+ for `\w+\.forward`"),
}


@contextlib.contextmanager
def silenced(*names: str) -> Iterator[None]:
    """Inside the block, the :data:`KNOWN` notices ``names`` are not shown."""
    with warnings.catch_warnings():
        for name in names:
            category, message = KNOWN[name]
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def peft_wrapping():
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: peft's read of the
    deprecated ``is_gradient_checkpointing``."""
    return silenced("is_gradient_checkpointing")


def has_prefix_tuning(model) -> bool:
    """``model`` is a ``peft.PeftModel`` with a prefix-tuning adapter."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return False
    return any(getattr(getattr(c, "peft_type", None), "value", None) == "PREFIX_TUNING"
               for c in configs.values())


def forward_of(model):
    """Around a forward (or a loss) of ``model``: peft's prefix passed as the deprecated
    ``past_key_values`` (only where ``model`` has a prefix-tuning adapter; elsewhere nothing
    is filtered)."""
    if has_prefix_tuning(model):
        return silenced("past_key_values")
    return contextlib.nullcontext()
