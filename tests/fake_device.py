"""A tensor that reports a CUDA device while its data stays in CPU memory: stands in for an
accelerator on a CPU-only machine when a test must tell "on the device" from "on the CPU"."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map


class OnDevice(torch.Tensor):
    """Wraps a CPU tensor; every op result is wrapped again (it stays "on the device") except
    a copy to the CPU (``.to("cpu")``, ``.cpu()``), which returns the plain tensor."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device="cuda",
                                                requires_grad=data.requires_grad)
        t.data_ = data
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrap = lambda x: x.data_ if isinstance(x, OnDevice) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        device = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and device is not None and torch.device(device).type == "cpu":
            return out
        return tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) else x, out)
