"""The backends, one subpackage each, every one implementing ``ops/contract.py``'s :class:`Backend`:

- ``reference``: pure torch, any device; the test oracle and the fallback;
- ``cpp``: the compiled core ``kmerge_fast._C`` on CPU tensors;
- ``triton``: Triton kernels on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``, forced only).

Which one runs a batch is decided in ``ops/__init__.py``, never here.
"""
