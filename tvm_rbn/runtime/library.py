"""An exported kernel library and its manifest."""
from __future__ import annotations

import json
from pathlib import Path

from .loader import load_module

LIBRARY_FILE = "kernels.so"
MANIFEST_FILE = "manifest.json"


class KernelLibrary:
    """One loaded runtime module; kernels are looked up by their spec's symbol."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / MANIFEST_FILE).read_text())
        self.symbols = {k["symbol"] for k in self.manifest["kernels"]}
        self.module = load_module(self.directory / LIBRARY_FILE)
        self._functions: dict[str, object] = {}

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.symbols

    def function(self, symbol: str):
        fn = self._functions.get(symbol)
        if fn is None:
            if symbol not in self.symbols:
                raise KeyError(f"kernel {symbol} is not in {self.directory}")
            fn = self._functions[symbol] = self.module[symbol]
        return fn
