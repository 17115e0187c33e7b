"""tvm_rbn: restructured BatchNorm (fission + fusion) for CNN training, kernels by Apache TVM."""
from . import functional
from .runtime import num_threads

__version__ = "0.1.0"
__all__ = ["functional", "num_threads"]
