"""Kernel specs: the static description of one kernel (operator + shapes + dtype + flags).

A spec is plain data and imports nothing from TVM, so the training path can name, look up and
call kernels without the compiler. ``KernelSpec.build_args()`` turns it into the TE argument
list of ``tvm_rbn.ops`` (importing TVM) when a kernel has to be compiled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable


_interned: dict["KernelSpec", "KernelSpec"] = {}


@dataclass(frozen=True)
class KernelSpec:
    op: str
    params: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, op: str, **params: Any) -> "KernelSpec":
        if op not in _BUILDERS:
            raise ValueError(f"unknown kernel op {op!r}; known: {sorted(_BUILDERS)}")
        canon = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        spec = cls(op, tuple(sorted((k, _freeze(v)) for k, v in canon.items())))
        # one instance per spec, so that its key and symbol are computed once per process
        return _interned.setdefault(spec, spec)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @cached_property
    def key(self) -> str:
        """Canonical JSON; equal specs have equal keys across processes and versions."""
        return json.dumps({"op": self.op, **{k: _thaw(v) for k, v in self.params}}, sort_keys=True)

    @cached_property
    def symbol(self) -> str:
        """The kernel's function name inside a runtime module."""
        return f"rbn_{self.op}_{hashlib.sha1(self.key.encode()).hexdigest()[:16]}"

    def build_args(self) -> list:
        """TE tensors and scalar vars of the kernel, inputs, then outputs, then scalars."""
        return _BUILDERS[self.op](**{k: _thaw(v) for k, v in self.params if k != "views"})

    def prim_func(self):
        """The kernel's TensorIR function: ``te.create_prim_func(build_args())``, with the
        buffers that the spec's ``views`` names declared as channel slices (see ``views``)."""
        from tvm import te

        func = te.create_prim_func(self.build_args())
        views = self.kwargs.get("views")
        return _with_channel_views(func, views) if views else func

    @classmethod
    def from_key(cls, key: str) -> "KernelSpec":
        d = json.loads(key)
        op = d.pop("op")
        return cls.make(op, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _with_channel_views(func, views):
    """Spec parameter ``views``: ((argument index, total channels T), ...). Each such 4-D
    argument (N, C, H, W) is a channel slice X[:, a:a+C] of a contiguous NCHW tensor X with T
    channels, read or written in place: its buffer gets strides (T*H*W, H*W, W, 1) and
    element alignment (a slice starts anywhere), instead of TVM's compact, 64-byte-aligned
    default. TVM checks the strides of what it is called with."""
    import tvm
    from tvm import tirx
    from tvm.tirx.transform.common import BufferReplacer

    mapping = {}
    for index, total in views:
        param = func.params[index]
        n, c, h, w = (int(d) for d in param.ty.shape)
        dtype = str(param.ty.dtype)
        mapping[param] = tirx.decl_buffer((n, c, h, w), dtype, param.name, None, [total * h * w, h * w, w, 1], None,
                                          "global", tvm.DataType(dtype).bits // 8, 1)
    return BufferReplacer(mapping)(func)


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def _conv2d_fused(n, c, h, w, k, r, s, stride, padding, dtype, prologue_relu, stats):
    from .ops.conv2d_bn import Conv2dGeometry, conv2d_fused

    geo = Conv2dGeometry(n, c, h, w, k, r, s, tuple(stride), tuple(padding))
    return conv2d_fused(geo, dtype, prologue_relu, stats)


def _bn_finalize(num_tiles, channels, tile_count, dtype, update_running):
    from .ops.bn import finalize

    return finalize(num_tiles, channels, tile_count, dtype, update_running)


def _bn_channel_stats(num_tiles, channels, tile_count, dtype):
    from .ops.bn import channel_stats

    return channel_stats(num_tiles, channels, tile_count, dtype)


def _bn_eval_coeffs(channels, dtype):
    from .ops.bn import eval_coeffs

    return eval_coeffs(channels, dtype)


def _bn_apply(shape, dtype, relu):
    from .ops.bn import apply

    return apply(tuple(shape), dtype, relu)


def _tile_stats(shape, dtype):
    from .ops.bn import tile_stats

    return tile_stats(tuple(shape), dtype)


def _geometry(n, c, h, w, k, r, s, stride, padding):
    from .ops.conv2d_bn import Conv2dGeometry

    return Conv2dGeometry(n, c, h, w, k, r, s, tuple(stride), tuple(padding))


def _conv2d_dgrad(n, c, h, w, k, r, s, stride, padding, dtype, grad_prologue, epilogue_relu, accumulate=False):
    from .ops.conv2d_bn_backward import conv2d_dgrad

    return conv2d_dgrad(_geometry(n, c, h, w, k, r, s, stride, padding), dtype, grad_prologue, epilogue_relu,
                        accumulate)


def _conv2d_wgrad(n, c, h, w, k, r, s, stride, padding, dtype, grad_prologue, prologue_relu):
    from .ops.conv2d_bn_backward import conv2d_wgrad

    return conv2d_wgrad(_geometry(n, c, h, w, k, r, s, stride, padding), dtype, grad_prologue, prologue_relu)


def _bn_backward_finalize(num_tiles, channels, tile_count, dtype):
    from .ops.bn_backward import finalize

    return finalize(num_tiles, channels, tile_count, dtype)


def _bn_backward_stats(shape, dtype, relu):
    from .ops.bn_backward import stats

    return stats(tuple(shape), dtype, relu)


def _bn_backward_dx(shape, dtype):
    from .ops.bn_backward import dx

    return dx(tuple(shape), dtype)


def _bn_add_relu(shape, dtype, second_bn):
    from .ops.residual import bn_add_relu

    return bn_add_relu(tuple(shape), dtype, second_bn)


def _bn_add_relu_backward(shape, dtype, second_bn):
    from .ops.residual import bn_add_relu_backward

    return bn_add_relu_backward(tuple(shape), dtype, second_bn)


def _bn_relu_maxpool(shape, dtype, relu, kernel, stride, padding):
    from .ops.pool import bn_relu_maxpool

    return bn_relu_maxpool(tuple(shape), dtype, relu, tuple(kernel), tuple(stride), tuple(padding))


def _bn_relu_maxpool_backward(shape, dtype, relu, kernel, stride, padding):
    from .ops.pool import bn_relu_maxpool_backward

    return bn_relu_maxpool_backward(tuple(shape), dtype, relu, tuple(kernel), tuple(stride), tuple(padding))


def _bn_relu_avgpool(shape, dtype, relu, kernel):
    from .ops.pool import bn_relu_avgpool

    return bn_relu_avgpool(tuple(shape), dtype, relu, tuple(kernel))


def _bn_relu_avgpool_backward(shape, dtype, relu, kernel):
    from .ops.pool import bn_relu_avgpool_backward

    return bn_relu_avgpool_backward(tuple(shape), dtype, relu, tuple(kernel))


_BUILDERS: dict[str, Callable[..., list]] = {
    "conv2d_fused": _conv2d_fused,
    "bn_finalize": _bn_finalize,
    "bn_eval_coeffs": _bn_eval_coeffs,
    "bn_apply": _bn_apply,
    "tile_stats": _tile_stats,
    "conv2d_dgrad": _conv2d_dgrad,
    "conv2d_wgrad": _conv2d_wgrad,
    "bn_backward_finalize": _bn_backward_finalize,
    "bn_backward_stats": _bn_backward_stats,
    "bn_backward_dx": _bn_backward_dx,
    "bn_channel_stats": _bn_channel_stats,
    "bn_add_relu": _bn_add_relu,
    "bn_add_relu_backward": _bn_add_relu_backward,
    "bn_relu_maxpool": _bn_relu_maxpool,
    "bn_relu_maxpool_backward": _bn_relu_maxpool_backward,
    "bn_relu_avgpool": _bn_relu_avgpool,
    "bn_relu_avgpool_backward": _bn_relu_avgpool_backward,
}
