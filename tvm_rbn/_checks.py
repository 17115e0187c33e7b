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


def channel_view_total(t: torch.Tensor) -> int | None:
    """T when t (4-D) is laid out as a channel slice X[:, a:b] of a contiguous NCHW tensor X
    with T channels (strides (T*H*W, H*W, W, 1); T = C for a contiguous tensor); else None."""
    if t.dim() != 4:
        return None
    n, c, h, w = t.shape
    s0, s1, s2, s3 = t.stride()
    if (s3, s2, s1) != (1, w, h * w) or h * w == 0 or s0 % (h * w) or s0 // (h * w) < c:
        return None
    return s0 // (h * w)


def tensor(t, name: str, ndim: int, channel_view: bool = False) -> torch.Tensor:
    """Validate one kernel argument. channel_view: a channel slice X[:, a:b] of a contiguous
    NCHW tensor is accepted (read or written in place) besides contiguous tensors."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise InputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{name} has dtype {t.dtype}; supported: float32, float64")
    if t.device.type != "cpu":
        raise InputError(f"{name} is on device {t.device}; these kernels were built for the host CPU")
    if not t.is_contiguous() and not (channel_view and channel_view_total(t) is not None):
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
