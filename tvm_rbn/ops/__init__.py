"""TE compute definitions of the restructured BatchNorm sub-layers.

One module per operator family; each holds only the compute, with named stages that the
schedule templates in ``schedules/`` find by name. Reference implementations with the same
signatures, over torch tensors, live in ``tvm_rbn.ops.reference``.

Stage names (the contract between ops and schedules):
    ``act``        prologue: relu(x * scale + shift) (or without relu)
    ``pad``        zero padding, applied after the prologue
    ``conv``       the convolution's reduction
    ``tile_sum``   statistics epilogue: per (n, k) plane sum of the output
    ``tile_m2``    statistics epilogue: per plane sum of squared deviations from the plane mean

Backward (``conv2d_bn_backward``, ``bn_backward``):
    ``grad``         grad prologue: c1*dz + c2*x + c3, the BatchNorm input gradient
    ``grad_pad``     the gradient with the zero border the data gradient's taps read
    ``dgrad``        the data gradient's reduction (conv_transpose), stride 1
    ``dgrad_{a}_{b}``  stride > 1: one reduction per stride phase pair (rows a, columns b) that
                     taps reach, over exactly its taps
    ``da``           the NCHW view of the phase(s) (the output, or inlined into ``dz``)
    ``dz``           BatchNorm(+ReLU) backward epilogue: da * [x*scale + shift > 0]
    ``tile_dbeta``   per (n, c) plane sum of dz
    ``tile_dgamma``  per (n, c) plane sum of dz*xhat
    ``wgrad``        the weight gradient's reduction over (n, p, q); its activation operand
                     is ``act`` + ``pad`` as in the forward

Residual branch end (``residual``): ``act`` = relu(y*scale + shift + identity or a second
BatchNorm's output); backward ``dz``, ``grad_y``, ``grad_y2`` / ``grad_identity``,
``tile_dbeta``, ``tile_dgamma``, ``tile_dgamma2``.

Max pool of a BatchNorm(+ReLU) output (``pool``): ``act_pad`` (the applied plane, -inf in the
padding), ``pool`` (value and argmax tap); backward ``dz``, ``grad_y``, ``tile_dbeta``,
``tile_dgamma`` (the residual backward's names and template).
"""
