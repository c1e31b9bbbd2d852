"""A crash-safe on-device store of merged adapter slots.

Layout of a store folder::

    manifest.json            the state: format version, settings, slots, history, file checksums
    slots/s003-g000017/      one peft adapter folder per slot version (adapter_config.json,
                             adapter_model.safetensors; loadable by PeftModel.from_pretrained)
    .lock                    held (flock) by the one writer that has the store open

A commit writes the slots that changed into *new* folders (named by slot and
generation), fsyncs every file and folder, then replaces ``manifest.json``
by an atomic rename and fsyncs the store folder. A crash at any moment
therefore leaves either the old manifest (which names only old, complete
folders) or the new one (whose folders were durable before it existed).
Folders no manifest names are leftovers of an interrupted commit or of
replaced slot versions; the writer deletes them after its next commit, in a
background thread (the commit is durable before they go; :meth:`Store.close`
waits for the deletions).

``Store.open`` verifies the manifest's SHA-256 of every file it names and
raises :class:`StoreError` on any mismatch: nothing is silently repaired.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .errors import KMergeError
from .lora import LoRA, atomic_write, fsync_dir, fsync_file

FORMAT = "kmerge_fast.store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
SLOTS = "slots"


class StoreError(KMergeError):
    """A store folder is missing, corrupt, tampered with, locked by another writer, or of another version."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_slot(lora: LoRA, path: Path, while_syncing: Callable[[], object] | None = None) -> dict[str, str]:
    """Write ``lora`` as a peft adapter into the new folder ``path`` and make it durable.

    The files are written in place (the folder is fresh and no manifest names
    it yet, so no per-file rename is needed), fsynced by a worker thread while
    this one hashes them (both mostly wait on I/O or run outside the GIL),
    then the folder is fsynced. ``while_syncing`` runs in a second worker
    meanwhile. Returns {file name: SHA-256 hex digest}.
    """
    lora.save(path, atomic=False)
    files = sorted(p for p in path.iterdir() if p.is_file())
    with ThreadPoolExecutor(2) as pool:
        synced = pool.submit(lambda: [fsync_file(p) for p in files])
        extra = pool.submit(while_syncing) if while_syncing is not None else None
        digests = {p.name: sha256(p) for p in files}
        synced.result()
        if extra is not None:
            extra.result()
    fsync_dir(path)
    return digests


class Store:
    """The files of an online merger's state. One writer at a time (an exclusive flock).

    Use :meth:`create` or :meth:`open`; :meth:`commit` writes a new state;
    :meth:`close` releases the lock.
    """

    def __init__(self, root: Path, lock_fd: int, manifest: dict):
        self.root = root
        self._lock_fd = lock_fd
        self.manifest = manifest
        self._cleaner: ThreadPoolExecutor | None = None  # deletes superseded slot folders

    # ----------------------------------------------------------- open / create
    @staticmethod
    def _lock(root: Path) -> int:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{root}: the store is open by another writer (lock {root / LOCK} is held)") from None
        return fd

    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict) -> "Store":
        """Start an empty store in ``root`` (created; it must not hold a store already)."""
        root = Path(root)
        if (root / MANIFEST).exists():
            raise StoreError(f"{root}: already holds a store (open it with OnlineMerger.open)")
        root.mkdir(parents=True, exist_ok=True)
        fd = cls._lock(root)
        store = cls(root, fd, {"format": FORMAT, "version": VERSION, "generation": 0, "settings": settings,
                               "slots": [], "history": []})
        try:
            store.commit({}, [], [])
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Store":
        """Open an existing store for writing: lock it and verify every checksum."""
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise StoreError(f"{root}: no store here ({MANIFEST} is missing)")
        fd = cls._lock(root)
        try:
            manifest = cls._read_manifest(root)
            for slot in manifest["slots"]:
                for name, digest in slot["files"].items():
                    path = root / SLOTS / slot["dir"] / name
                    if not path.is_file():
                        raise StoreError(f"{path}: missing (named by {root / MANIFEST})")
                    if sha256(path) != digest:
                        raise StoreError(f"{path}: checksum mismatch (corrupt or modified since it was written)")
        except BaseException:
            os.close(fd)
            raise
        return cls(root, fd, manifest)

    @staticmethod
    def _read_manifest(root: Path) -> dict:
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not a kmerge_fast store manifest")
        if manifest.get("version") != VERSION:
            raise StoreError(f"{path}: store format version {manifest.get('version')!r}; this kmerge_fast reads {VERSION}")
        for key in ("generation", "settings", "slots", "history"):
            if key not in manifest:
                raise StoreError(f"{path}: manifest lacks {key!r}")
        return manifest

    def close(self) -> None:
        """Wait for pending deletions, then release the writer lock (idempotent)."""
        if self._cleaner is not None:
            self._cleaner.shutdown(wait=True)
            self._cleaner = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    # --------------------------------------------------------------- contents
    def load_slot(self, index: int) -> LoRA:
        """The adapter of slot ``index``, as last committed."""
        return LoRA.load(self.root / SLOTS / self.manifest["slots"][index]["dir"])

    def slot_dir(self, index: int) -> Path:
        return self.root / SLOTS / self.manifest["slots"][index]["dir"]

    # ----------------------------------------------------------------- commit
    def commit(self, changed: dict[int, LoRA], slot_meta: list[dict], history: list[dict],
               while_syncing: Callable[[], object] | None = None) -> None:
        """Write a new state atomically.

        Args:
            changed: slot index -> adapter, for the slots whose factors changed
                (a new index appends a slot).
            slot_meta: per slot (all of them, in order) a JSON-able dict of
                metadata (members, counts) stored in the manifest.
            history: the full JSON-able history list.
            while_syncing: optional callable, run in a worker thread while the
                first changed slot's files are fsynced (the CPU is mostly idle
                then); not run when no slot changed. Its exception fails the commit.
        """
        if not self.is_open:
            raise StoreError(f"{self.root}: the store is closed")
        generation = self.manifest["generation"] + 1
        slots_root = self.root / SLOTS
        slots_root.mkdir(exist_ok=True)
        old = self.manifest["slots"]
        entries = []
        for index, meta in enumerate(slot_meta):
            if index in changed:
                folder = f"s{index:03d}-g{generation:06d}"
                path = slots_root / folder
                if path.exists():  # a leftover of an interrupted commit of this same generation
                    shutil.rmtree(path)
                files = write_slot(changed[index], path, while_syncing)
                while_syncing = None  # once
                entries.append({"dir": folder, "files": files, **meta})
            else:
                entries.append({"dir": old[index]["dir"], "files": old[index]["files"], **meta})
        fsync_dir(slots_root)
        manifest = dict(self.manifest, generation=generation, slots=entries, history=history)
        text = json.dumps(manifest, indent=1, sort_keys=True)
        atomic_write(self.root / MANIFEST, lambda tmp: Path(tmp).write_text(text))
        self.manifest = manifest
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        """Queue the slot folders no manifest names for deletion in the background.

        The list is taken now: later commits write folders of later generations,
        which are never on it. Deleting a large file can take milliseconds
        (the filesystem may discard its blocks), time a commit need not wait for.
        """
        live = {slot["dir"] for slot in self.manifest["slots"]}
        slots_root = self.root / SLOTS
        dead = [p for p in slots_root.iterdir() if p.name not in live] if slots_root.is_dir() else []
        if dead:
            if self._cleaner is None:
                self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="kmerge-store-cleanup")
            self._cleaner.submit(lambda: [shutil.rmtree(p, ignore_errors=True) for p in dead])
