"""tvm_rbn: restructured BatchNorm (fission + fusion) for CNN training, kernels by Apache TVM.

    model = tvm_rbn.restructure(model)   # then train as usual
    print(tvm_rbn.report(model))
"""
from . import functional
from .bridge import UntunedKernelWarning, report, restructure
from .runtime import num_threads

__version__ = "0.1.0"
__all__ = ["functional", "num_threads", "report", "restructure", "UntunedKernelWarning"]
