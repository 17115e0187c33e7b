"""The `weights=` argument of the builders: only None is accepted (nothing is downloaded here)."""
from __future__ import annotations

from typing import Any


def check_no_weights(builder: str, weights: Any) -> None:
    """Raise if a builder was asked for pretrained weights.

    The builders mirror torchvision's signatures, but these machines cannot download anything.
    To use trained parameters, build the model with ``weights=None`` and load a torchvision
    state_dict yourself: ``model.load_state_dict(torch.load(path), strict=True)``.
    """
    if weights is not None:
        raise ValueError(
            f"{builder}(weights={weights!r}): pretrained weights are not available; nothing is "
            f"downloaded. Build with weights=None and load a torchvision state_dict with "
            f"model.load_state_dict(torch.load(path)) instead."
        )
