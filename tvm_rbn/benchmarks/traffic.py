"""Bytes moved per BatchNorm layer in a training step: a model from the kernels' reads and
writes, not a measurement.

Counted: passes over a tensor the size of the BatchNorm's input x (B bytes) that exist
because of the BatchNorm (+ReLU), beyond what the convolutions read and write anyway (conv_l
writes x, conv_{l+1} reads its input, its data gradient writes a gradient, ...).

PyTorch eager, training:
    forward   statistics (read x), normalize (read x, write y), ReLU (read y, write a):  5 (3 without ReLU)
    backward  ReLU (read da and a, write dy), BatchNorm reductions (read dy, x), input
              gradient (read dy, x, write dx):                                            8 (5 without ReLU)
Restructured, by how the layer was fused (``tvm_rbn.report``'s ``fused``):
    full        statistics in conv_l's epilogue and apply in conv_{l+1}'s prologue: forward 0;
                backward: the ReLU mask and the BatchNorm partials in conv_{l+1}'s data-gradient
                epilogue, conv_l's data and weight gradients read dz and x (grad prologue)
                instead of dx: 2
    statistics  epilogue statistics, a standalone apply (read x, write a): 2; backward: a
                standalone BatchNorm(+ReLU) backward pass (read da, x) + the grad prologue: 4
    apply       a standalone statistics pass (read x): 1; backward 2
    none        as eager
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

EAGER = {True: (5, 8), False: (3, 5)}
RESTRUCTURED = {"full": (0, 2), "statistics": (2, 4), "apply": (1, 2)}


def _relu_follows(model: nn.Module) -> dict[str, bool]:
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  (untraceable: count every BatchNorm as followed by a ReLU)
        return {}
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            users = list(node.users)
            out[node.target] = len(users) == 1 and (
                (users[0].op == "call_module" and isinstance(modules.get(users[0].target), nn.ReLU))
                or (users[0].op == "call_function" and users[0].target in (torch.relu, nn.functional.relu)))
    return out


def per_layer(model: nn.Module, input_shape) -> list[dict]:
    """One row per BatchNorm2d: input bytes, ReLU after it, fused kind, passes and bytes per side."""
    import tvm_rbn

    sizes: dict[str, int] = {}
    meta = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, inp[0].numel()
                                                                                         * inp[0].element_size()))
             for name, m in meta.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        meta.train()(torch.empty(tuple(input_shape), device="meta"))
    for h in hooks:
        h.remove()
    relu = _relu_follows(model)
    fused = {r.name: r.fused for r in tvm_rbn.report(tvm_rbn.restructure(copy.deepcopy(model)))}
    rows = []
    for name, nbytes in sizes.items():
        eager = EAGER[relu.get(name, True)]
        ours = RESTRUCTURED.get(fused.get(name, "none"), eager)
        rows.append({"name": name, "input_bytes": nbytes, "relu": relu.get(name, True), "fused": fused.get(name, "none"),
                     "eager_passes": eager, "tvm_rbn_passes": ours,
                     "eager_bytes": nbytes * sum(eager), "tvm_rbn_bytes": nbytes * sum(ours)})
    return rows


def summary(model: nn.Module, input_shape) -> dict:
    rows = per_layer(model, input_shape)
    eager = sum(r["eager_bytes"] for r in rows)
    ours = sum(r["tvm_rbn_bytes"] for r in rows)
    return {"layers": rows, "eager_mib": eager / 2**20, "tvm_rbn_mib": ours / 2**20,
            "ratio": ours / eager if eager else float("nan")}
