"""Input validation for the functional API: every problem is named before a kernel runs."""
from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class InputError(ValueError):
    """An argument a kernel cannot take (shape, dtype, device, layout, value)."""


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int):
        vals = (value, value)
    elif isinstance(value, (tuple, list)):
        vals = tuple(value)
    else:
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    if len(vals) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value!r}")
    return vals  # type: ignore[return-value]


def tensor(t, name: str, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{name} has dtype {t.dtype}; supported: float32, float64")
    if t.device.type != "cpu":
        raise InputError(f"{name} is on device {t.device}; these kernels were built for the host CPU")
    if not t.is_contiguous():
        if ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
            raise InputError(f"{name} is channels_last; these kernels take contiguous NCHW (call .contiguous())")
        raise InputError(f"{name} is not contiguous (strides {t.stride()}); call .contiguous()")
    if t.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.requires_grad and torch.is_grad_enabled():
        raise InputError(
            f"{name} requires grad: tvm_rbn.functional ops are not differentiable; "
            "call them under torch.no_grad() or use the autograd bridge"
        )
    return t


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise InputError(f"dtypes differ: {', '.join(f'{k}={v}' for k, v in dtypes.items())}")
    return next(iter(dtypes.values()))


def shape(t: torch.Tensor, name: str, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise InputError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
