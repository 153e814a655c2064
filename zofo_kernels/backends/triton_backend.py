"""Placeholder while the triton_backend backend is being written: registers as unavailable."""
from .base import Backend, BackendStatus, register


class _Pending(Backend):
    name = "triton"

    def status(self):
        return BackendStatus(self.name, False, "not built yet")

    def supports_device(self, device):
        return False

    def noise(self, *a):
        raise RuntimeError("unavailable")

    def perturb(self, *a):
        raise RuntimeError("unavailable")

    def update(self, *a):
        raise RuntimeError("unavailable")


register("triton", _Pending)
