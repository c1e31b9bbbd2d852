"""kmerge_fast: fast, correct merging of LoRA adapters for on-device language models.

Public API::

    import kmerge_fast as kf
    lora = kf.LoRA.load("adapters/qa_en")          # peft adapter folder
    merged = kf.merge([a, b], [0.5, 0.5], method="svd")
    sims = kf.similarity_matrix([new], stored, metric="cos")
    kf.backends()                                  # ["cpp", "reference"] on a CPU machine
    kf.peft.add_weighted_adapter(peft_model, ["a", "b"], [0.5, 0.5], "ab")   # peft's method, faster
    merger = kf.OnlineMerger(budget=4, store="slots/")   # K-Merge: merger.add(lora, task="qa_en")
    result = kf.d2c.cluster({"qa_en": a, ...}, budget=5, scorer=kf.d2c.LossScorer(model, tok, examples))
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

# The public names load their module (and so torch) on first use (PEP 562), so that
# `import kmerge_fast` and `kmerge-fast --help` stay fast: name -> module that defines it.
_LAZY = {
    "AdapterError": ".errors",
    "BackendError": ".errors",
    "KMergeError": ".errors",
    "LoRA": ".adapter",
    "LoRAModule": ".adapter",
    "merge": ".merge",
    "truncate": ".merge",
    "OnlineMerger": ".online",
    "calibrate_threshold": ".online",
    "backends": ".ops",
    "use_backend": ".ops",
    "similarity_matrix": ".similarity",
}
# Submodules reachable as attributes (kf.d2c, kf.online, ...) without an explicit import;
# kf.peft imports peft (and transformers). `merge` is the function, not the submodule.
_SUBMODULES = ("adapter", "cli", "d2c", "errors", "formats", "lora", "names", "online", "opcm", "ops", "peft", "scoring",
               "similarity", "store")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


class _Package(_types.ModuleType):
    """The class of this package's module object: keeps ``kf.merge`` the function.

    Importing the submodule ``kmerge_fast.merge`` (which every numeric module
    does) makes the import system set the package attribute ``merge`` to that
    submodule; with a lazy ``merge`` that would then shadow the function. This
    property ignores that assignment (the submodule stays in ``sys.modules``),
    as the eager ``from .merge import merge`` of earlier versions did.
    """

    @property
    def merge(self):
        return _importlib.import_module(".merge", __name__).merge

    @merge.setter
    def merge(self, value) -> None:
        pass


_sys.modules[__name__].__class__ = _Package

__all__ = [
    "AdapterError",
    "BackendError",
    "KMergeError",
    "LoRA",
    "LoRAModule",
    "backends",
    "OnlineMerger",
    "calibrate_threshold",
    "merge",
    "similarity_matrix",
    "truncate",
    "use_backend",
]
