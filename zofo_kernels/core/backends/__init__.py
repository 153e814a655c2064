"""Backends of the kernel API. Importing this package registers all four; each reports
whether it can run here (and why not) through ``status()``."""

from zofo_kernels.core.backends import base, reference  # noqa: F401
from zofo_kernels.core.backends.native import cpu, cuda  # noqa: F401
from zofo_kernels.core.backends.triton import launcher  # noqa: F401
from zofo_kernels.core.backends.base import BackendStatus, BackendUnavailableError  # noqa: F401
