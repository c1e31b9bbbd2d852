"""Exceptions raised by kmerge_fast.

Every error names what it is about (a file, a module, an argument) so that a
user with hundreds of adapters can find the bad one.
"""


class KMergeError(Exception):
    """Base class of every error kmerge_fast raises on purpose."""


class AdapterError(KMergeError, ValueError):
    """An adapter is missing, corrupt, of an unsupported type, or inconsistent.

    The message names the file and, where it applies, the module.
    """


class BackendError(KMergeError, RuntimeError):
    """A kernel backend was forced (``KMERGE_FAST_BACKEND``) but cannot run here."""
