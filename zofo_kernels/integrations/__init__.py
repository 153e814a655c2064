"""Hugging Face integrations: the ``ZOFOTrainer`` (transformers.Trainer), saving and reloading
trained models, prompt-based classification heads and the method registry. Needs the
``[hf]`` extra; imports only from :mod:`zofo_kernels.core`."""

from zofo_kernels.core.requirements import require_extra

require_extra("hf", "zofo_kernels.integrations")
