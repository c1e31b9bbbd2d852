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

from . import d2c
from .errors import AdapterError, BackendError, KMergeError
from .lora import LoRA, LoRAModule
from .merge import merge, truncate
from .online import OnlineMerger, calibrate_threshold
from .ops import backends, use_backend
from .similarity import similarity_matrix

__version__ = "0.1.0"


def __getattr__(name: str):
    # kf.peft imports peft (and transformers): only when first used.
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
