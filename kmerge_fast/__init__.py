"""kmerge_fast: fast, correct merging of LoRA adapters for on-device language models.

Public API::

    import kmerge_fast as kf
    lora = kf.LoRA.load("adapters/qa_en")          # peft adapter folder
    merged = kf.merge([a, b], [0.5, 0.5], method="svd")
    sims = kf.similarity_matrix([new], stored, metric="cos")
    kf.backends()                                  # ["cpp", "reference"] on a CPU machine
"""

from .errors import AdapterError, BackendError, KMergeError
from .lora import LoRA, LoRAModule
from .merge import merge, truncate
from .ops import backends, use_backend
from .similarity import similarity_matrix

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BackendError",
    "KMergeError",
    "LoRA",
    "LoRAModule",
    "backends",
    "merge",
    "similarity_matrix",
    "truncate",
    "use_backend",
]
