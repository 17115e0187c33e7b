"""DenseNet blocks restructured: one fused op per dense block over a preallocated block buffer.

The pattern (DESIGN.md section 4). A dense block of L layers concatenates its input x0 (C0
channels) with every layer's output (G channels each, the growth rate); layer j reads the
concatenation of everything before it::

    f_0 = x0;  f_j = conv2_j(relu(norm2_j(conv1_j(relu(norm1_j(cat(f_0 .. f_{j-1}))))))
    block output = cat(f_0 .. f_L)

Unrestructured, every layer's ``cat`` copies all earlier features (quadratic traffic and
memory: each copy is also saved for norm1's backward), and norm1_j recomputes the statistics
of every earlier channel.

What the fused op does instead:

- **One block buffer.** ``X`` (N, C0 + L*G, H, W) is allocated once per call; x0 is copied
  into its first C0 channels (the one copy: the block's input is produced by a pooling layer
  outside), and conv2_j writes its G output channels straight into ``X[:, C_j:C_j+G]``, a
  channel-slice view of X (C_j = C0 + j*G). conv1_j reads ``X[:, :C_j]`` in place, also as a
  view. The kernels take these views as they are: their specs declare the channel stride of
  the buffer (``KernelSpec`` ``views``), so no concatenation exists, forward or backward.
- **Statistics once per channel.** A channel's batch mean and variance do not depend on which
  layer reads it, so they are computed once, where the channel is produced: in the statistics
  epilogue of conv2_j (x0's channels: one standalone statistics pass), merged into per-channel
  (mean, biased var) rows ``S`` (2, C_total) by ``bn_channel_stats``. norm1_j gathers
  ``S[:, :C_j]`` and forms its own scale/shift from its own gamma/beta (and its own eps),
  updating its own running statistics: per-channel arithmetic only, no pass over the data.
  norm2_j (over conv1_j's output, read by conv2_j only) is the ordinary chain: conv1_j's
  epilogue, conv2_j's prologue.
- **Backward over the same buffer.** The gradient of X, ``GX``, accumulates per channel what
  every reader of that channel contributes with its coefficients held fixed: conv1_k's data
  gradient writes ``GX[:, :C_k] + scale_k*dz_k`` from its epilogue, in the pass that forms
  dz_k (which never goes to memory), into the first C_k channels of another buffer of X's
  shape. Two such buffers take turns (the first layer reads the incoming gradient itself: no
  copy of it, and nothing is read while it is written); channels past C_k are stale once
  layer k is done, as nothing reads them again. What the readers contribute through the
  shared statistics is accumulated as the true derivatives dL/dmean and dL/dvar per channel::

      dL/dmean += -scale_k*dbeta_k,   dL/dvar += -0.5*scale_k*invstd_k*dgamma_k

  (from shift = beta - mean*scale, scale = gamma*(var + eps)^-1/2). Layers are processed in
  reverse, so when layer j is reached every reader of its output channels is done, and the
  gradient at conv2_j's output is ``GX[:, sl] + C2*X[:, sl] + C3`` with C2 = 2*dL/dvar/m,
  C3 = dL/dmean/m - C2*mean: formed in the prologue of conv2_j's dgrad and wgrad kernels from
  the two views (``DeferredGrad``), never materialized. x0's gradient is the same expression
  over its channels (one ``bn_backward_dx`` pass).

The block's outputs are X (the concatenation, as a plain contiguous NCHW tensor) and S; the
BatchNorm that reads the block output (a transition's, or the final norm5) takes S instead of
recomputing statistics (``bn_from_stats``; its gradient for S is the same dL/dmean, dL/dvar
pair, so the block's backward needs no special case for it), and its apply goes into the next
conv's prologue or a standalone apply like any other BatchNorm's.

The fx rewrite (``rewrite_dense_blocks``) recognizes a block by its concatenations: a chain of
``torch.cat(..., 1)`` nodes whose lists grow by one tensor each, the tensor being produced
from the previous concatenation by BN-ReLU-conv-BN-ReLU-conv (convs without groups,
dilation or bias, stride 1, odd square kernels with "same" padding). Anything else (dropout
between layers, a different layer body) is left to the per-BatchNorm rewrite.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, fx, nn

from ..runtime import buffers
from .. import functional as rbn
from ..build import provider

_LIB = "tvm_rbn"


def _pad(weight: Tensor) -> tuple[int, int]:
    return ((weight.shape[2] - 1) // 2, (weight.shape[3] - 1) // 2)


def _affine_from_stats(stats: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
                       eps: float, factor: float, m: int):
    """Training-mode coeffs (4, C) of a BatchNorm over channels whose (mean, biased var) are
    known, and its updated running statistics (empty tensors when it tracks none)."""
    if m <= 1:  # as BatchNorm2d: the unbiased running variance needs two values
        raise ValueError(f"Expected more than 1 value per channel when training, got {m} per channel")
    mean, var = stats[0], stats[1]
    invstd = torch.rsqrt(var + eps)
    scale = gamma * invstd
    coeffs = torch.stack([scale, beta - mean * scale, mean, invstd])
    if running_mean.numel() == 0:
        return coeffs, running_mean.new_empty(0), running_var.new_empty(0)
    new_rm = running_mean * (1 - factor) + mean * factor
    new_rv = running_var * (1 - factor) + var * (factor * m / (m - 1))
    return coeffs, new_rm, new_rv


def _eval_coeffs(gamma, beta, running_mean, running_var, eps):
    invstd = torch.rsqrt(running_var + eps)
    scale = gamma * invstd
    return torch.stack([scale, beta - running_mean * scale, running_mean, invstd])


def _channel_stats(tile_sum: Tensor, tile_m2: Tensor, count: int) -> Tensor:
    mean, var = rbn.bn_channel_stats(tile_sum, tile_m2, count)
    return torch.stack([mean, var])


# --- the block op -----------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::dense_block", mutates_args=())
def dense_block(
    x0: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor], running_means: list[Tensor],
    running_vars: list[Tensor], eps: list[float], factors: list[float], batch_stats: list[bool], growth: int,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """A dense block's forward. Per BatchNorm k (norm1_j = 2j, norm2_j = 2j+1): gamma, beta,
    running statistics (empty when untracked), eps, the running-average factor, and whether
    it normalizes with batch statistics (else with its running statistics, eval mode).
    weights: conv1_j, conv2_j per layer. Returns (X, S, conv1 outputs, coeffs per BatchNorm,
    new running means, new running vars)."""
    x0 = x0.detach()
    n, c0, h, w = x0.shape
    layers = len(weights) // 2
    total = c0 + layers * growth
    m = n * h * w
    X = buffers.empty_like(x0, (n, total, h, w))
    X[:, :c0].copy_(x0)  # the block's one copy: its input, produced outside the block
    S = x0.new_empty((2, total))
    S[:, :c0] = _channel_stats(*rbn.batch_stats(x0), h * w)
    y1s, coeffs, new_rms, new_rvs = [], [], [], []

    def norm(k: int, stats: Optional[Tensor], tiles=None):
        g, b, rm, rv = gammas[k].detach(), betas[k].detach(), running_means[k], running_vars[k]
        if not batch_stats[k]:
            coeffs.append(_eval_coeffs(g, b, rm, rv, eps[k]))
            new_rms.append(rm.new_empty(0)), new_rvs.append(rv.new_empty(0))
        else:
            if stats is None:
                stats = _channel_stats(*tiles, h * w)
            c, new_rm, new_rv = _affine_from_stats(stats, g, b, rm, rv, eps[k], factors[k], m)
            coeffs.append(c)
            new_rms.append(new_rm), new_rvs.append(new_rv)
        return rbn.BNCoefficients(*coeffs[-1].unbind(0))

    for j in range(layers):
        cj = c0 + j * growth
        w1, w2 = weights[2 * j].detach(), weights[2 * j + 1].detach()
        c1 = norm(2 * j, S[:, :cj])
        y1, ts1, tm1 = rbn.bn_relu_conv2d_stats(X[:, :cj], c1.scale, c1.shift, w1, 1, _pad(w1))
        c2 = norm(2 * j + 1, None, (ts1, tm1))
        _, ts2, tm2 = rbn.bn_relu_conv2d_stats(y1, c2.scale, c2.shift, w2, 1, _pad(w2), out=X[:, cj:cj + growth])
        S[:, cj:cj + growth] = _channel_stats(ts2, tm2, h * w)
        y1s.append(y1)
    return X, S, y1s, coeffs, new_rms, new_rvs


@dense_block.register_fake
def _(x0, weights, gammas, betas, running_means, running_vars, eps, factors, batch_stats, growth):
    n, c0, h, w = x0.shape
    layers = len(weights) // 2
    total = c0 + layers * growth
    y1s = [x0.new_empty((n, weights[2 * j].shape[0], h, w)) for j in range(layers)]
    coeffs = [x0.new_empty((4, weights[k].shape[1] if k % 2 == 0 else weights[k - 1].shape[0]))
              for k in range(2 * layers)]
    running = [rm.new_empty(rm.shape if batch_stats[k] and rm.numel() else (0,)) for k, rm in enumerate(running_means)]
    running_v = [rv.new_empty(rv.shape if batch_stats[k] and rv.numel() else (0,)) for k, rv in enumerate(running_vars)]
    return x0.new_empty((n, total, h, w)), x0.new_empty((2, total)), y1s, coeffs, running, running_v


@torch.library.custom_op(f"{_LIB}::dense_block_backward", mutates_args=())
def dense_block_backward(
    g_X: Tensor, g_S: Tensor, X: Tensor, S: Tensor, y1s: list[Tensor], coeffs: list[Tensor], weights: list[Tensor],
    batch_stats: list[bool], c0: int, growth: int,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients of x0, of every conv weight, gamma and beta (see the module docstring)."""
    n, total, h, w = X.shape
    m = n * h * w
    layers = len(weights) // 2
    GX = g_X.contiguous()  # read only: each layer's running sum goes to the other of two buffers
    spare = [buffers.empty_like(g_X), buffers.empty_like(g_X)] if layers else []
    mean = S[0]
    d_mean, d_var = g_S[0].clone(), g_S[1].clone()
    g_w: list = [None] * (2 * layers)
    g_gamma: list = [None] * (2 * layers)
    g_beta: list = [None] * (2 * layers)
    for j in reversed(range(layers)):
        cj = c0 + j * growth
        sl = slice(cj, cj + growth)
        w1, w2, y1 = weights[2 * j], weights[2 * j + 1], y1s[j]
        co1, co2 = (rbn.BNCoefficients(*coeffs[k].unbind(0)) for k in (2 * j, 2 * j + 1))
        # the gradient at conv2_j's output (channels sl of X): every reader of them is done
        c2 = 2 * d_var[sl] / m
        g2 = rbn.DeferredGrad(GX[:, sl], X[:, sl], torch.ones_like(c2), c2, d_mean[sl] / m - c2 * mean[sl])
        g_w[2 * j + 1] = rbn.bn_relu_conv2d_wgrad(g2, y1, co2.scale, co2.shift, tuple(w2.shape[2:]), 1, _pad(w2))
        dz2, tb2, tg2 = rbn.conv2d_dgrad_bn_relu(g2, w2, y1, co2, 1, _pad(w2))
        g_gamma[2 * j + 1], g_beta[2 * j + 1] = tg2.sum(0), tb2.sum(0)
        if batch_stats[2 * j + 1]:
            gc2 = -co2.scale * co2.invstd * g_gamma[2 * j + 1] / m
            gc3 = -co2.scale * g_beta[2 * j + 1] / m - gc2 * co2.mean
        else:
            gc2, gc3 = torch.zeros_like(co2.scale), torch.zeros_like(co2.scale)
        # the gradient at conv1_j's output, c1*dz2 + c2*y1 + c3, formed in the prologues
        g1 = rbn.DeferredGrad(dz2, y1, co2.scale, gc2, gc3)
        x_in = X[:, :cj]
        g_w[2 * j] = rbn.bn_relu_conv2d_wgrad(g1, x_in, co1.scale, co1.shift, tuple(w1.shape[2:]), 1, _pad(w1))
        into = spare[j % 2]
        _, tb1, tg1 = rbn.conv2d_dgrad_bn_relu(g1, w1, x_in, co1, 1, _pad(w1), accumulate=GX[:, :cj],
                                               out=into[:, :cj])
        GX = into
        del dz2, g1
        g_gamma[2 * j], g_beta[2 * j] = tg1.sum(0), tb1.sum(0)
        if batch_stats[2 * j]:
            d_mean[:cj] -= co1.scale * g_beta[2 * j]
            d_var[:cj] -= 0.5 * co1.scale * co1.invstd * g_gamma[2 * j]
    c2 = 2 * d_var[:c0] / m
    ones = torch.ones_like(c2)
    g_x0 = rbn.bn_backward_dx(GX[:, :c0], X[:, :c0],
                              rbn.BNGradCoefficients(ones, ones, ones, c2, d_mean[:c0] / m - c2 * mean[:c0]))
    return g_x0, g_w, g_gamma, g_beta


@dense_block_backward.register_fake
def _(g_X, g_S, X, S, y1s, coeffs, weights, batch_stats, c0, growth):
    n, _, h, w = X.shape
    layers = len(weights) // 2
    g_gamma = [c.new_empty(c.shape[1]) for c in coeffs]
    return (X.new_empty((n, c0, h, w)), [torch.empty_like(wt) for wt in weights], g_gamma,
            [c.new_empty(c.shape[1]) for c in coeffs][: 2 * layers])


def _setup_dense(ctx, inputs, output):
    # conv1's outputs and the coefficients are outputs only to be saved: no gradient reaches
    # them, and materialized zeros for them cost a pass per layer (16 x 128 x 56 x 56 in
    # densenet121's first block: about 6 ms each)
    ctx.set_materialize_grads(False)
    ctx.owner = provider.current_owner()
    x0, weights, gammas, _, _, _, _, _, batch_stats, growth = inputs
    X, S, y1s, coeffs = output[:4]
    ctx.layers = len(weights) // 2
    ctx.save_for_backward(X, S, *y1s, *coeffs, *weights)
    ctx.conf = (list(batch_stats), x0.shape[1], growth)


def _backward_dense(ctx, g_X, g_S, *_unused):
    saved = ctx.saved_tensors
    L = ctx.layers
    X, S = saved[:2]
    y1s, coeffs, weights = saved[2:2 + L], saved[2 + L:2 + 3 * L], saved[2 + 3 * L:]
    batch_stats, c0, growth = ctx.conf
    g_X = torch.zeros_like(X) if g_X is None else g_X
    g_S = torch.zeros_like(S) if g_S is None else g_S
    with provider.owner(ctx.owner):
        g_x0, g_w, g_gamma, g_beta = torch.ops.tvm_rbn.dense_block_backward(
            g_X, g_S, X, S, list(y1s), list(coeffs), list(weights), batch_stats, c0, growth)
    none = [None] * (2 * L)  # running statistics: no gradient (a list, like the input)
    return g_x0, list(g_w), list(g_gamma), list(g_beta), none, list(none), None, None, None, None


torch.library.register_autograd(f"{_LIB}::dense_block", _backward_dense, setup_context=_setup_dense)


# --- a BatchNorm over a dense block's output: statistics given --------------------------------


@torch.library.custom_op(f"{_LIB}::bn_from_stats", mutates_args=())
def bn_from_stats(stats: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], eps: float, factor: float, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode coeffs from per-channel (mean, biased var) rows over `count` values per
    channel, and the updated running statistics (empty when untracked)."""
    c = stats.shape[1]
    g = torch.ones(c, dtype=stats.dtype) if gamma is None else gamma.detach()
    b = torch.zeros(c, dtype=stats.dtype) if beta is None else beta.detach()
    empty = stats.new_empty(0)
    rm = empty if running_mean is None else running_mean.detach()
    rv = empty if running_var is None else running_var.detach()
    return _affine_from_stats(stats.detach(), g, b, rm, rv, eps, factor, count)


@bn_from_stats.register_fake
def _(stats, gamma, beta, running_mean, running_var, eps, factor, count):
    c = stats.shape[1]
    size = c if running_mean is not None else 0
    return stats.new_empty((4, c)), stats.new_empty(size), stats.new_empty(size)


def _setup_from_stats(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.affine = inputs[1] is not None


def _backward_from_stats(ctx, g_coeffs, *_unused):
    """g_coeffs rows (dgamma, dbeta) (tvm_rbn.bridge.ops convention) -> gamma, beta and the
    true derivatives (dL/dmean, dL/dvar) of the statistics."""
    (coeffs,) = ctx.saved_tensors
    scale, _, _, invstd = coeffs.unbind(0)
    dgamma, dbeta = g_coeffs[0], g_coeffs[1]
    need = ctx.needs_input_grad
    g_stats = torch.stack([-scale * dbeta, -0.5 * scale * invstd * dgamma]) if need[0] else None
    return (g_stats, dgamma if ctx.affine and need[1] else None, dbeta if ctx.affine and need[2] else None,
            None, None, None, None, None)


torch.library.register_autograd(f"{_LIB}::bn_from_stats", _backward_from_stats, setup_context=_setup_from_stats)


# --- the module --------------------------------------------------------------------------------


class RBNDenseBlock(nn.Module):
    """A whole dense block as one fused op (see the module docstring). Returns (X, S).

    The layers' BatchNorm and Conv2d modules are referenced, not owned: they stay registered
    at their original paths, so parameter and buffer names, state_dicts and optimizers are
    those of the original model.
    """

    def __init__(self, layers: list[tuple[nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]]):
        super().__init__()
        self.__dict__["layers"] = list(layers)  # plain attribute: not submodules
        self.growth = int(layers[0][3].out_channels)
        self.kernels: set = set()  # symbols of the kernels run for the block's BatchNorms

    def forward(self, x0: Tensor):
        with provider.owner(self.kernels):
            return self._forward(x0)

    def _forward(self, x0: Tensor):
        if x0.dim() != 4:
            raise ValueError(f"expected 4D input (got {x0.dim()}D input)")
        weights, gammas, betas, rms, rvs, eps, factors, batch_stats, updates = [], [], [], [], [], [], [], [], []
        c = x0.shape[1]
        for norm1, conv1, norm2, conv2 in self.layers:
            weights += [conv1.weight, conv2.weight]
            for bn, channels in ((norm1, c), (norm2, conv1.out_channels)):
                use_batch = bn.training or bn.running_mean is None
                update = bn.training and bn.track_running_stats
                factor = 0.0
                if update:
                    bn.num_batches_tracked.add_(1)
                    factor = float(bn.momentum) if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                ones = torch.ones(channels, dtype=x0.dtype) if bn.weight is None else None
                gammas.append(bn.weight if bn.weight is not None else ones)
                betas.append(bn.bias if bn.bias is not None else torch.zeros(channels, dtype=x0.dtype))
                empty = x0.new_empty(0)
                rms.append(bn.running_mean if bn.running_mean is not None and (update or not use_batch) else empty)
                rvs.append(bn.running_var if bn.running_var is not None and (update or not use_batch) else empty)
                eps.append(float(bn.eps)), factors.append(factor), batch_stats.append(bool(use_batch))
                updates.append(bn if update else None)
            c += self.growth
        X, S, _, _, new_rms, new_rvs = torch.ops.tvm_rbn.dense_block(
            x0.contiguous(), weights, gammas, betas, rms, rvs, eps, factors, batch_stats, self.growth)
        with torch.no_grad():
            for bn, new_rm, new_rv in zip(updates, new_rms, new_rvs):
                if bn is not None:
                    bn.running_mean.copy_(new_rm)
                    bn.running_var.copy_(new_rv)
        return X, S


# --- the fx rewrite ----------------------------------------------------------------------------

SHARED_HOW = "once per channel: in the epilogue of the conv that produced it, the block input's in one pass"


@dataclass
class DenseMatch:
    x0: fx.Node
    cats: list  # cat nodes, in order; the last is the block output
    layers: list  # (norm1, relu1, conv1, norm2, relu2, conv2) nodes per layer


def _cat_list(node: fx.Node):
    """The tensors of a torch.cat(..., dim=1) node, else None."""
    if node.op != "call_function" or node.target is not torch.cat:
        return None
    args = list(node.args)
    tensors = args[0] if args else node.kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    if dim != 1 or not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return tuple(tensors)


def _single_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match_layer(inp: fx.Node, modules: dict, calls: dict, is_relu, conv_unsupported):
    """The six nodes of BN-ReLU-conv-BN-ReLU-conv reading `inp` (its only user), or None."""
    nodes = []
    node = inp
    for kind in ("bn", "relu", "conv", "bn", "relu", "conv"):
        nxt = _single_user(node)
        if nxt is None or nxt.kwargs and kind != "relu" or not nxt.args or nxt.args[0] is not node:
            return None
        if kind == "relu":
            if not is_relu(nxt, modules) or len(nxt.args) != 1:
                return None
        else:
            mod = modules.get(nxt.target) if nxt.op == "call_module" else None
            if mod is None or calls.get(nxt.target, 0) != 1 or len(nxt.args) != 1:
                return None
            if kind == "bn" and type(mod) is not nn.BatchNorm2d:
                return None
            if kind == "conv":
                if conv_unsupported(mod):  # first: it also refuses what is no Conv2d (a pool)
                    return None
                r, s = mod.kernel_size
                if (mod.bias is not None or tuple(mod.stride) != (1, 1) or r % 2 == 0 or s % 2 == 0
                        or tuple(mod.padding) != ((r - 1) // 2, (s - 1) // 2)):
                    return None
        nodes.append(nxt)
        node = nxt
    return nodes


def find_dense_blocks(graph: fx.Graph, modules: dict, calls: dict, is_relu, conv_unsupported) -> list[DenseMatch]:
    cats = [n for n in graph.nodes if _cat_list(n) is not None]
    by_list = {_cat_list(n): n for n in cats}
    matches = []
    for start in cats:
        lst = _cat_list(start)
        if len(lst) != 1:
            continue
        chain, layers, current = [start], [], start
        while True:
            layer = _match_layer(current, modules, calls, is_relu, conv_unsupported)
            if layer is None:
                break
            nxt = by_list.get(_cat_list(current) + (layer[-1],))
            if nxt is None:
                break
            layers.append(layer)
            chain.append(nxt)
            current = nxt
        if not layers:
            continue
        m = DenseMatch(lst[0], chain, layers)
        if _consistent(m, modules):
            matches.append(m)
    return matches


def _consistent(m: DenseMatch, modules: dict) -> bool:
    """Channel counts add up, and each layer's output is read only by the block's later cats."""
    mod = lambda node: modules[node.target]  # noqa: E731
    growth = mod(m.layers[0][5]).out_channels
    c = mod(m.layers[0][2]).in_channels
    for j, (n1, _, c1, n2, _, c2) in enumerate(m.layers):
        if (mod(c1).in_channels != c or mod(n1).num_features != c or mod(n2).num_features != mod(c1).out_channels
                or mod(c2).in_channels != mod(c1).out_channels or mod(c2).out_channels != growth):
            return False
        if set(c2.users) != set(m.cats[j + 1:]):
            return False
        c += growth
    return True


def rewrite_dense_blocks(gm: fx.GraphModule, prefix: str, modules: dict, calls: dict, is_relu, conv_unsupported,
                         decision_cls, fallback: dict | None = None) -> tuple[list, dict]:
    """Replace each recognized dense block by one RBNDenseBlock node. Returns the decisions of
    the blocks' BatchNorms and {block output node: (statistics node, block name)}.

    fallback: {qualified BatchNorm name: reason}. The block buffer holds all of a block's
    layers or none, so a block with any BatchNorm in `fallback` is left in PyTorch as a whole
    (its nodes untouched, each of its BatchNorms decided "not restructured").
    """
    graph = gm.graph
    fallback = fallback or {}
    decisions, outputs = [], {}
    for index, m in enumerate(find_dense_blocks(graph, modules, calls, is_relu, conv_unsupported)):
        names = [[node.target for node in layer] for layer in m.layers]
        common = names[0][0].split(".")
        for layer in names:
            for path in layer:
                parts = path.split(".")
                k = 0
                while k < min(len(common), len(parts)) and common[k] == parts[k]:
                    k += 1
                common = common[:k]
        block_name = ".".join(common) if common else f"dense_block{index}"
        norms = [prefix + node.target for layer in m.layers for node in (layer[0], layer[3])]
        hit = next((n for n in norms if n in fallback), None)
        if hit is not None:
            whole = (f"in dense block {prefix}{block_name}, left in PyTorch as a whole (a block buffer holds all "
                     f"its layers or none; {hit}: {fallback[hit]})")
            decisions += [decision_cls(n, False, fallback.get(n, whole)) for n in norms]
            continue
        path = ".".join(common + ["_rbn_dense"]) if common else f"_rbn_dense_block{index}"
        block = RBNDenseBlock([tuple(modules[node.target] for node in (l[0], l[2], l[3], l[5])) for l in m.layers])
        if common:
            gm.get_submodule(".".join(common)).add_module("_rbn_dense", block)
        else:
            gm.add_module(path, block)
        last = m.cats[-1]
        with graph.inserting_before(last):
            node = graph.call_module(path, (m.x0,))
            X = graph.call_function(operator.getitem, (node, 0))
            S = graph.call_function(operator.getitem, (node, 1))
        last.replace_all_uses_with(X)
        doomed = list(m.cats) + [n for layer in m.layers for n in layer]
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(doomed, key=order.get, reverse=True):
            graph.erase_node(n)
        shared = f"shared block statistics of {prefix}{block_name} ({SHARED_HOW})"
        for (n1, _, c1, n2, _, c2) in m.layers:
            d1 = decision_cls(prefix + n1.target, True, stats=shared, apply=[f"prologue of {prefix}{c1.target}"])
            d2 = decision_cls(prefix + n2.target, True, stats=f"epilogue of {prefix}{c1.target}",
                              apply=[f"prologue of {prefix}{c2.target}"])
            d1.kernels = d2.kernels = block.kernels
            decisions += [d1, d2]
        outputs[X] = (S, block_name)
    return decisions, outputs
