"""tvm_rbn: restructured BatchNorm (fission + fusion) for CNN training, kernels by Apache TVM.

    model = tvm_rbn.restructure(model)   # then train as usual
    print(tvm_rbn.report(model))
"""
from . import _threads

_threads.set_passive_before_torch()  # before torch is first imported

from . import functional  # noqa: E402
from ._threads import ThreadSpinWarning  # noqa: E402
from .bridge import UntunedKernelWarning, report, restructure  # noqa: E402
from .runtime import num_threads  # noqa: E402

__version__ = "0.1.0"
__all__ = ["functional", "num_threads", "report", "restructure", "ThreadSpinWarning", "UntunedKernelWarning"]
