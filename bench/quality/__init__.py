"""Quality benchmark (issue 7): S-score of the online mergers and D2C on real LoRA adapters.

``python -m bench.quality prepare | train | eval | all [--tiny]``; see ``__main__.py``.
Stages: :mod:`.model` (base model), :mod:`.tasks` (synthetic multilingual tasks),
:mod:`.train` (one LoRA per task), :mod:`.evaluate` (greedy decoding with a merged
slot applied), :mod:`.report` (quality.json / .md / .png).
"""
