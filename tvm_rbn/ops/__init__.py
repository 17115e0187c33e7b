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
"""
