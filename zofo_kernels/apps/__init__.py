"""The applications: ``zofo-train`` (fine-tuning command), ``zofo-bench`` (step time and
memory), data and model loading, plots, measurement and the MeZO reference step. Needs the
``[apps]`` extra; imports from :mod:`zofo_kernels.integrations` and :mod:`zofo_kernels.core`."""

from zofo_kernels.core.requirements import require_extra

require_extra("apps", "zofo_kernels.apps")
