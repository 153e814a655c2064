"""Backends of the kernel API. Importing this package registers all four; each reports
whether it can run here (and why not) through ``status()``."""

from . import base, reference  # noqa: F401
from . import cpu, cuda, triton_backend  # noqa: F401
from .base import BackendStatus, BackendUnavailableError  # noqa: F401
