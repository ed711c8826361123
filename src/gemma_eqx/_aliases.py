"""The flat module paths of 0.1 (`gemma_eqx.checkpoint`, `gemma_eqx.sharding`, ...) kept
working: each is the module at its new home, imported when first asked for (so `import
gemma_eqx.throughput` costs what it did, and `gemma_eqx.checkpoint is
gemma_eqx.formats.kaggle`)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

MOVED = {
    "atomic": "core.atomic", "checks": "core.checks", "config": "core.config",
    "multihost": "core.multihost", "runtime": "core.runtime",
    "display": "model.display", "generate": "model.generate", "modules": "model.modules",
    "params": "model.params", "scanned": "model.scanned", "sites": "model.sites",
    "weights": "model.weights",
    "sharding": "parallel.sharding", "throughput": "parallel.throughput",
    "checkpoint": "formats.kaggle", "gguf": "formats.gguf", "hf": "formats.hf",
    "pretrained": "formats.pretrained", "tokenizer": "formats.tokenizer",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `gemma_eqx.<old name>` with the module at its new home."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != __package__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(f"{__package__}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._original = module.__spec__  # the import system overwrites it; put back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._original


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
