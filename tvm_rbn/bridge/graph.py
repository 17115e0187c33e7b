"""Find the BatchNorm chains of a traced model and rewrite them onto the fused ops.

For every BatchNorm2d node:
  producer   the Conv2d that feeds it (and nothing else) gets the statistics epilogue: both
             become one RBNBatchNorm2d node returning (raw y, coeffs); otherwise the
             statistics come from a standalone kernel;
  activation the BN output, or the ReLU that is its only user;
  consumers  each Conv2d reading the activation as its input takes (y, coeffs) and
             applies BN(+ReLU) in its prologue; a MaxPool2d (a stem's) becomes one fused
             BN(+ReLU) + max-pool kernel, and so does an AvgPool2d over non-overlapping
             windows, also when it follows a 1x1 conv (a DenseNet transition: the conv moves
             after the pool, which it commutes with, does kh*kw times fewer FLOPs and runs
             on our kernels as a plain conv); any other user reads one materialized
             activation (standalone apply kernel).

BatchNorms named in `fallback` (measured slower than PyTorch at build time, or forced) stay
unchanged PyTorch modules, like unsupported ones, and so does the conv that produces their
input: the whole conv-BN(-ReLU) layer runs in PyTorch, and a BatchNorm before it applies
into a materialized activation instead of that conv's prologue.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import _checks as check
from .. import functional as rbn
from .dense import SHARED_HOW, rewrite_dense_blocks
from .modules import RBNBatchNorm2d, RBNConv2d, bn_add_relu, bn_apply, bn_avgpool, bn_maxpool


@dataclass
class BNDecision:
    name: str
    restructured: bool
    reason: str = ""
    stats: str = ""  # where the statistics come from
    apply: list[str] = field(default_factory=list)  # where the apply(+ReLU) happens
    kernels: set = field(default_factory=set)  # symbols of the kernels run for this BN


def conv_unsupported(conv: nn.Module) -> str:
    """Why a conv cannot carry fused sub-layers ('' if it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain Conv2d"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 is supported)"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)} (only 1 is supported)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit padding is supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zeros)"
    return ""


def bn_unsupported(bn: nn.Module) -> str:
    if type(bn) is not nn.BatchNorm2d:
        return f"{type(bn).__name__} is not a plain BatchNorm2d"
    return ""


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


_ADDS = (operator.add, operator.iadd, torch.add)


def _add_relu(node: fx.Node, act: fx.Node, modules: dict):
    """(other operand, the ReLU node) if `node` is `act + other` (other a different node) whose
    only user is a ReLU, else None."""
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is act else a if b is act else None
    if not isinstance(other, fx.Node) or other is act or len(node.users) != 1:
        return None
    (relu,) = node.users
    if not _is_relu(relu, modules) or relu.args[0] is not node or len(relu.args) != 1:
        return None
    return other, relu


def _module(node: fx.Node, modules: dict):
    return modules.get(node.target) if node.op == "call_module" else None


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _set_module(gm: fx.GraphModule, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def rewrite(gm: fx.GraphModule, prefix: str = "", fallback: dict[str, str] | None = None) -> list[BNDecision]:
    """Rewrite `gm` in place (its graph and its own submodule slots); returns one decision per BN.

    fallback: {qualified BatchNorm name: reason} of the BatchNorms to leave in PyTorch with
    their producing convs (a dense block's: the whole block, see rewrite_dense_blocks).
    """
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = _call_counts(graph)
    fallback = fallback or {}
    decisions: list[BNDecision] = []
    act_info: dict[fx.Node, tuple] = {}  # activation node -> (y, coeffs, relu, decision[, applied])
    dead: list[fx.Node] = []  # old nodes to erase, users before producers
    pytorch_convs: set[str] = set()  # convs producing a fallback BatchNorm's input: no prologue either

    def single_use(node: fx.Node) -> bool:
        return calls.get(node.target, 0) == 1

    # dense blocks first: each becomes one node returning (block buffer, per-channel statistics)
    dense_decisions, dense_outputs = rewrite_dense_blocks(gm, prefix, modules, calls, _is_relu, conv_unsupported,
                                                          BNDecision, fallback)
    decisions += dense_decisions
    decided = {d.name for d in dense_decisions}  # incl. the BatchNorms of blocks left in PyTorch

    for node in list(graph.nodes):
        bn = _module(node, modules)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        name = prefix + node.target
        if name in decided:
            continue
        reason = bn_unsupported(bn) or ("" if single_use(node) else "module is called more than once")
        if not reason and len(node.args) != 1:
            reason = "unexpected call signature"
        if not reason and name in fallback:
            reason = fallback[name]
            src = node.args[0]
            if isinstance(src, fx.Node) and isinstance(_module(src, modules), nn.Conv2d):
                pytorch_convs.add(src.target)
        if reason:
            decisions.append(BNDecision(name, False, reason))
            continue
        decision = BNDecision(name, True)
        src = node.args[0]
        conv = _module(src, modules) if isinstance(src, fx.Node) else None
        fuse_conv = (
            conv is not None and not conv_unsupported(conv) and len(src.users) == 1 and single_use(src)
            and len(src.args) == 1 and not src.kwargs
        )
        kwargs = {}
        with graph.inserting_before(node):
            if src in dense_outputs:  # the block's statistics, computed once per channel, are this BN's
                stats, block_name = dense_outputs[src]
                args, kwargs, relu_in, fuse_conv = (src,), {"stats": stats}, False, False
                decision.stats = f"shared block statistics of {prefix}{block_name} ({SHARED_HOW})"
            elif fuse_conv:
                conv_in = src.args[0]
                prologue = act_info.get(conv_in)
                weight = graph.get_attr(src.target + ".weight")
                if prologue is not None:
                    args = (prologue[0], prologue[1], weight)
                    prologue[3].apply.append(f"prologue of {prefix}{src.target}")
                else:
                    args = (conv_in, None, weight)
                if conv.bias is not None:  # folded into this BN (tvm_rbn.bridge.ops, "Conv bias")
                    args += (graph.get_attr(src.target + ".bias"),)
                relu_in = prologue[2] if prologue is not None else False
                decision.stats = f"epilogue of {prefix}{src.target}" + (
                    " (its bias folded into the BatchNorm)" if conv.bias is not None else "")
                dead.append(src)
            else:
                args = (_materialize(graph, src, act_info),) if src in act_info else (src,)
                relu_in = False
                why = conv_unsupported(conv) if conv is not None and conv_unsupported(conv) else "input is not a conv output"
                decision.stats = f"standalone ({why})"
            new = graph.call_module(node.target, args, kwargs)
            y, coeffs = (graph.call_function(operator.getitem, (new, i)) for i in range(2))
        rbn_bn = RBNBatchNorm2d.from_batchnorm(bn, conv if fuse_conv else None, relu_in)
        _set_module(gm, node.target, rbn_bn)
        decision.kernels = rbn_bn.kernels

        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules) and users[0].args[0] is node:
            act, relu = users[0], True
            dead.extend([act, node])
        else:
            act, relu = node, False
            dead.append(node)
        act_info[act] = (y, coeffs, relu, decision)
        decisions.append(decision)

    for act in list(act_info):
        y, coeffs, relu, decision = act_info[act][:4]
        for user in list(act.users):
            if user in dead:
                continue
            residual = None if relu else _add_relu(user, act, modules)
            if residual is not None:
                _fuse_add_relu(graph, user, act, residual, act_info, decision, prefix)
                continue
            conv = _module(user, modules)
            pool = _fusable_maxpool(user, act, modules)
            conv_pool = _conv_before_avgpool(user, act, modules)
            avg_window = _avgpool_window(user, act, modules)
            if pool is not None:
                with graph.inserting_before(user):
                    new = graph.call_function(bn_maxpool, (y, coeffs, relu, *pool))
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                decision.apply.append(f"max-pool kernel of {prefix}{user.target} (one pass)")
            elif conv_pool is not None:  # act -> 1x1 conv -> pool  becomes  act -> pool -> conv
                pool_node, window = conv_pool
                with graph.inserting_before(user):
                    pooled = graph.call_function(bn_avgpool, (y, coeffs, relu, window))
                    new = graph.call_module(user.target, (pooled,))
                pool_node.replace_all_uses_with(new)
                graph.erase_node(pool_node)
                graph.erase_node(user)
                where = "PyTorch's"
                if not conv_unsupported(conv):  # a plain conv on our kernels, counted for this BN
                    _set_module(gm, user.target, RBNConv2d.from_conv(conv, False, decision.kernels))
                    where = "ours"
                decision.apply.append(f"average-pool kernel of {prefix}{pool_node.target} (one pass; "
                                      f"{prefix}{user.target} moved after it, {where})")
            elif avg_window is not None:
                with graph.inserting_before(user):
                    new = graph.call_function(bn_avgpool, (y, coeffs, relu, avg_window))
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                decision.apply.append(f"average-pool kernel of {prefix}{user.target} (one pass)")
            elif user.op == "call_module" and user.target in pytorch_convs:
                user.replace_input_with(act, _materialize(graph, act, act_info))
                decision.apply.append(f"standalone for {prefix}{user.target} (left in PyTorch with its BatchNorm)")
            elif (conv is not None and not conv_unsupported(conv) and single_use(user) and len(user.args) == 1
                    and user.args[0] is act and not user.kwargs):
                with graph.inserting_before(user):
                    new = graph.call_module(user.target, (y, coeffs))
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                _set_module(gm, user.target, RBNConv2d.from_conv(conv, relu, decision.kernels))
                decision.apply.append(f"prologue of {prefix}{user.target}")
            else:
                user.replace_input_with(act, _materialize(graph, act, act_info))
                decision.apply.append(f"standalone for {prefix}{user.name}")

    doomed = set(dead)
    for node in reversed(list(graph.nodes)):  # users before the nodes they use
        if node in doomed:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return decisions


def _fusable_maxpool(user: fx.Node, act: fx.Node, modules: dict):
    """(kernel, stride, padding) of an nn.MaxPool2d reading only the activation, in the
    form the fused kernel computes (dilation 1, floor mode, no indices); else None."""
    pool = _module(user, modules)
    if type(pool) is not nn.MaxPool2d or user.args != (act,) or user.kwargs:
        return None
    geo = rbn.pool_geometry(pool.kernel_size, pool.stride, pool.padding)
    if (check.pair(pool.dilation, "dilation", 1) != (1, 1) or pool.ceil_mode or pool.return_indices
            or any(2 * p > k for p, k in zip(geo["padding"], geo["kernel"]))):
        return None
    return tuple(list(geo[key]) for key in ("kernel", "stride", "padding"))


def _avgpool_window(user: fx.Node, src: fx.Node, modules: dict):
    """The window of an nn.AvgPool2d reading only `src` over non-overlapping windows (stride =
    kernel, no padding, floor mode, the window's own divisor), as the fused kernel computes it;
    else None."""
    pool = _module(user, modules)
    if type(pool) is not nn.AvgPool2d or user.args != (src,) or user.kwargs:
        return None
    geo = rbn.pool_geometry(pool.kernel_size, pool.stride, pool.padding)
    if geo["stride"] != geo["kernel"] or geo["padding"] != (0, 0) or pool.ceil_mode or pool.divisor_override:
        return None
    return list(geo["kernel"])


def _conv_before_avgpool(user: fx.Node, act: fx.Node, modules: dict):
    """(pool node, window) when `user` is a 1x1 conv (stride 1, no padding) of the activation
    alone whose only user is such an average pool. A 1x1 conv is a per-position linear map
    and the pool a per-channel average over positions, so pool(conv(a)) = conv(pool(a)),
    bias included; the conv then runs on kh*kw times fewer positions."""
    conv = _module(user, modules)
    if (type(conv) is not nn.Conv2d or user.args != (act,) or user.kwargs or tuple(conv.kernel_size) != (1, 1)
            or tuple(conv.stride) != (1, 1) or conv.padding not in ((0, 0), "valid") or len(user.users) != 1):
        return None
    (pool_node,) = user.users
    window = _avgpool_window(pool_node, user, modules)
    return None if window is None else (pool_node, window)


def _fuse_add_relu(graph: fx.Graph, add: fx.Node, act: fx.Node, residual, act_info: dict, decision: BNDecision,
                   prefix: str) -> None:
    """relu(bn(y) + other) -> one bn_add_relu node; other is a second BN's raw output (its
    apply joins the same pass) when it is a BN without ReLU, else a tensor."""
    other, relu = residual
    y, coeffs = act_info[act][:2]
    other_info = act_info.get(other)
    with graph.inserting_before(relu):
        if other_info is not None and not other_info[2]:
            new = graph.call_function(bn_add_relu, (y, coeffs, other_info[0], other_info[1]))
            decision.apply.append(f"add+ReLU kernel with {other_info[3].name} (one pass)")
            other_info[3].apply.append(f"add+ReLU kernel with {decision.name} (one pass)")
        else:
            operand = _materialize(graph, other, act_info) if other_info is not None else other
            new = graph.call_function(bn_add_relu, (y, coeffs, operand, None))
            decision.apply.append(f"add+ReLU kernel with the identity {prefix}{other.name} (one pass)")
    relu.replace_all_uses_with(new)
    graph.erase_node(relu)
    graph.erase_node(add)


def _materialize(graph: fx.Graph, act: fx.Node, act_info: dict) -> fx.Node:
    """One standalone apply node per activation, created on first need."""
    info = act_info[act]
    if len(info) == 5:
        return info[4]
    y, coeffs, relu, _ = info
    with graph.inserting_after(coeffs):
        node = graph.call_function(bn_apply, (y, coeffs, relu))
    act_info[act] = (*info, node)
    return node
