"""Reference implementations in plain PyTorch, one module per family in ``tvm_rbn.ops``.

They take the same inputs as the kernels (as torch tensors) and return the same outputs;
tests compare kernels against them and them against torch.nn.functional.
"""
