"""A crash-safe on-device store of merged adapter slots.

Layout of a store folder::

    manifest.json            the state, as canonical JSON: format version, settings, slots (folder,
                             members, the SHA-256 of each file), history, the folders awaiting deletion
                             (``obsolete``), and the SHA-256 of all that (``checksum``)
    slots/s003-g000017/      one peft adapter folder per slot version: slot 3, written by the commit of
                             generation 17 (adapter_config.json, adapter_model.safetensors; loadable
                             by PeftModel.from_pretrained), and the slot in the store's other formats:
        adapter.gguf             llama.cpp's GGUF LoRA (``--lora``), if the store emits ``gguf``
        mlx/adapters.safetensors, mlx/adapter_config.json
                                 MLX-LM's adapter folder (``--adapter-path``), if it emits ``mlx``
                                 (in a folder of its own: its config has peft's file name)
    .lock                    held (flock, exclusive) by the one writer that has the store open

Commit. A commit writes the slots that changed into *new* folders (named by
slot and generation), fsyncs every file and folder, then replaces
``manifest.json`` by an atomic rename and fsyncs the store folder. A crash at
any moment therefore leaves either the old manifest (which names only old,
complete folders) or the new one (whose folders were durable before it
existed). The rename is the commit point: an error after it (the fsync of the
store folder, a KeyboardInterrupt) still raises, but the store's in-memory
manifest is the new one (:attr:`Store.generation` tells the caller), and the
online merger's memory follows it. Generation numbers are never reused, not
even those of a commit that failed, so no commit ever writes into a folder of
an earlier one.

Formats. peft is the store's own format: always written, and the only one it
reads back. ``settings.formats`` (absent in stores that emit nothing else, which
means ``["peft"]``) lists the formats every slot version is written in, in
:data:`FORMAT_FILES`'s order; the other formats' files are written into the same
new folder before the manifest's rename, made durable like the peft files, and
listed with their SHA-256 in ``slots[i].files``: a device runtime reads them
straight from the store. A GGUF needs the base model: ``settings.gguf`` holds
its path (``base``: absolute, a base GGUF file, a transformers ``config.json``
or its folder; the store copies nothing), the ``dtype`` of the factors, and
what identifies the base (``architecture``, ``head_count``, ``head_count_kv``,
``block_count``, ``head_dim``; null where the base does not say): a writer
refuses to add while the base at that path no longer matches them. The GGUF's
``adapter.lora.task_name`` is the slot's tasks. A writer checks each newcomer
against the formats (modules llama.cpp or MLX-LM can place, shapes of the base
GGUF, task names without commas) before any work, so that an add they would
fail changes nothing; a write that fails all the same fails the commit (its
folder goes as a failed commit's does). Verification hashes these files like
the peft files; nothing parses them. The fields are optional, so the format
version stays 2: a store of peft alone is written as before, and a kmerge_fast
from before them refuses a store that has them (``settings.formats: unknown
field``) rather than add slots without their other formats.

Mode settings. A store in ``isoswitch`` mode records its switch point,
``settings.isonorm_up_to`` (an int >= 1; :data:`kmerge_fast.strategies.ISONORM_UP_TO`
when it was created), and goes on with it when a later kmerge_fast with
another default resumes it. Optional, like the formats: an ``isoswitch`` store
written before stores recorded it has none and follows the running
kmerge_fast's constant; a store of another mode never has one.

What a store deletes: only folders under ``slots/`` that it wrote itself, and
only the files of its formats in them (a folder holding anything else stays):

- the folders a manifest lists under ``obsolete``: slot versions an earlier
  manifest named and a later one replaced, and folders of a commit that failed
  in this process. They go in a background thread once a manifest that no
  longer names them is durable (:meth:`Store.close` waits), and are dropped
  from the list by the next commit that finds them gone;
- when a writer opens the store, the leftovers of a commit a crash
  interrupted: folders named ``sNNN-gNNNNNN`` of a generation above the
  manifest's (a committed manifest never names a folder of a later
  generation) that hold nothing but the files of the store's formats (and,
  for the formats written through :func:`kmerge_fast.files.atomic_write`,
  its temporary files ``.<name>.<8 hex digits>.tmp``), the ``mlx/`` folder
  holding nothing else;
- when a writer opens the store, the temporary files of an interrupted
  manifest write (``.manifest.json.<random>.tmp``, regular files only).

Nothing else is touched: a user's ``slots/my_adapter`` stays. A store is only
created in a missing or empty folder (:class:`StoreError` otherwise), so that
it never mistakes what it finds for its own.

Verification. The manifest is validated against its schema (types, ranges,
slot folders inside ``slots/``, a SHA-256 for exactly the files of every
slot, members consistent with the history, the settings through the caller's
check) and against its own ``checksum``, the SHA-256 of its canonical JSON
body (:func:`manifest_checksum`); any mismatch is a :class:`StoreError`
naming the field (``.../manifest.json: slots[1].dir: ...``). Slot files are
read into memory once, the SHA-256 of those bytes is checked, and those same
bytes are parsed (:meth:`Store.load_slots`): a loaded adapter never depends on
its files afterwards. A writer records each verified file's identity (inode,
size, mtime, ctime) and before every commit checks that no file the manifest
names changed since (re-hashing one that did): it refuses to commit over a
modified store rather than carry a damaged file forward. Nothing is ever
repaired silently.

Readers. ``Store.open(root, readonly=True)`` (and
``OnlineMerger.open(root, readonly=True)``, ``kmerge-fast inspect`` /
``export``) take no lock and write nothing: no lock file, no cleanup, no
temporary file, so they work on a read-only file system and while a writer
streams. A reader reads the manifest once (the atomic rename makes it the last
committed state) and then the slot bytes it names, checking their SHA-256. A
writer deletes a slot folder right after the commit that made it obsolete, so
a reader that read the manifest just before may find a file gone: it then
re-reads the manifest and reads the slots whose folder changed (up to
:data:`READ_ATTEMPTS` times in all), then raises :class:`StoreError`. Readers take no shared lock because a reader
holding ``LOCK_SH`` would block a writer's ``LOCK_EX`` (a stream would stall,
or fail, behind an ``inspect``), and because creating the lock file fails on a
read-only file system; atomic replacement plus checksums give them a
consistent snapshot without one. Only writers exclude each other.

This module imports torch only inside the functions that build or write
adapters, so that reading a manifest (``kmerge-fast inspect``) does not pay
for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import KMergeError
from .files import fsync_dir, fsync_file

if TYPE_CHECKING:
    from .lora import LoRA

FORMAT = "kmerge_fast.store"
#: 2: the manifest carries its own checksum and the ``obsolete`` list (version 1 had neither).
VERSION = 2
MANIFEST = "manifest.json"
LOCK = ".lock"
SLOTS = "slots"
#: The files of a slot folder: lora.CONFIG_NAME and lora.WEIGHTS_NAME (spelled out here so that
#: reading a manifest imports no torch; a test checks they agree).
SLOT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: Format -> the files it puts into a slot folder (paths relative to it; :mod:`kmerge_fast.formats` names
#: the formats). peft's are :data:`SLOT_FILES`; MLX-LM's sit in ``mlx/``, its config having peft's file name.
FORMAT_FILES = {"peft": SLOT_FILES, "gguf": ("adapter.gguf",),
                "mlx": ("mlx/adapter_config.json", "mlx/adapters.safetensors")}
#: The dtypes of a GGUF slot's factors (formats.gguf.save_gguf's ``dtype``).
GGUF_DTYPES = ("f32", "f16", "bf16")
#: How many times a reader re-reads the manifest when a writer removed the folders it named meanwhile.
READ_ATTEMPTS = 5
#: The actions of the history (online.Step.action).
ACTIONS = ("new", "merge", "replace")

# sNNN-gNNNNNN: slot index and generation. ASCII digits only ([0-9], not \d: int() takes other digits too).
_SLOT_DIR = re.compile(r"s([0-9]{3,9})-g([0-9]{6,20})")
# Generations at or above this are not the store's (one commit a microsecond would take 30,000 years to
# get there): such a folder found in slots/ does not raise the next generation, which keeps names valid.
_MAX_GENERATION = 10**18
# The temporary names of _replace_manifest (os.urandom hex), the only temporary files a writer removes.
_MANIFEST_TMP = re.compile(r"\." + re.escape(MANIFEST) + r"\.[0-9a-f]{8,32}\.tmp")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# files.atomic_write's temporary names, ".<name>.<secrets.token_hex(4)>.tmp": a crashed GGUF or MLX write's
_ATOMIC_TMP = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")

_TOP_KEYS = ("format", "version", "checksum", "generation", "settings", "slots", "obsolete", "history")
_SETTINGS_KEYS = ("budget", "strategy", "similarity", "threshold", "mode", "seed", "density")
_OPTIONAL_SETTINGS = ("formats", "gguf",   # absent: peft only
                      "isonorm_up_to")      # isoswitch's switch point; absent: another mode, or an older store
#: What identifies a GGUF base model (formats.gguf's reading of it), kept in settings.gguf beside base and dtype.
_GGUF_IDENTITY = ("architecture", "head_count", "head_count_kv", "block_count", "head_dim")
_GGUF_KEYS = ("base", "dtype", *_GGUF_IDENTITY)
_SLOT_KEYS = ("dir", "files", "tasks", "rank", "extra")
_STEP_KEYS = ("task", "slot", "action", "similarities", "seconds")
_OPCM_KEYS = ("lambda", "norm_sum", "count")


class StoreError(KMergeError):
    """A store folder is missing, corrupt, tampered with, locked by another writer, of another version,
    opened read-only for a write, or a folder a store refuses to write into (an export into a store or
    over a non-empty folder, a new store in a folder that is not empty)."""


def slot_folder(index: int, generation: int) -> str:
    """The folder name of slot ``index`` written by the commit of ``generation``: ``s003-g000017``."""
    return f"s{index:03d}-g{generation:06d}"


def _parse_folder(name: object) -> tuple[int, int] | None:
    """(slot index, generation) of a slot folder name, or None for any other name."""
    match = _SLOT_DIR.fullmatch(name) if isinstance(name, str) else None
    return (int(match[1]), int(match[2])) if match else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(st: os.stat_result) -> tuple:
    """What changes when a file is rewritten, replaced or touched: device, inode, size, mtime, ctime
    (ctime cannot be set back by the user)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_file(path: Path, keep: bool) -> tuple[str, bytes | None, tuple, tuple]:
    """(SHA-256 hex, the bytes if ``keep`` else None, fingerprint before the read, fingerprint after).

    Raises FileNotFoundError if ``path`` is missing, StoreError if it is not a regular file.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: not a regular file")
        if keep:
            data = f.read()
            digest = hashlib.sha256(data).hexdigest()
        else:
            data, h = None, hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            digest = h.hexdigest()
        after = os.fstat(f.fileno())
    return digest, data, _fingerprint(st), _fingerprint(after)


# ------------------------------------------------------------------ formats
def store_formats(settings: dict) -> tuple[str, ...]:
    """The formats of a store's slots: ``settings["formats"]``, or peft alone (a store without the field)."""
    return tuple(settings.get("formats", ("peft",)))


def slot_files(formats: Sequence[str]) -> tuple[str, ...]:
    """The files of a slot folder written in ``formats`` (paths relative to the folder)."""
    return tuple(name for fmt in formats for name in FORMAT_FILES[fmt])


def format_settings(formats: Sequence[str] = ("peft",), base: str | os.PathLike | None = None,
                    dtype: str | None = None) -> dict:
    """The settings fields of a store that writes its slots in ``formats``: ``{}`` for peft alone, else
    ``formats`` (in :data:`FORMAT_FILES`'s order) and, with ``gguf``, ``gguf`` {base, dtype, the base's
    identity} (module docstring). ``base`` (gguf only, required): a base GGUF file, a transformers
    ``config.json`` or its folder, read now; ``dtype`` (gguf only): one of :data:`GGUF_DTYPES`, default f32.

    Raises ValueError ``"formats: ..."``, ``"base: ..."``, ``"gguf_dtype: ..."``, or AdapterError for a
    base that cannot be read or is not supported.
    """
    chosen = [formats] if isinstance(formats, str) else list(formats)
    for fmt in chosen:
        if fmt not in FORMAT_FILES:
            raise ValueError(f"formats: unknown {fmt!r}; choose from {list(FORMAT_FILES)}")
        if chosen.count(fmt) > 1:
            raise ValueError(f"formats: {fmt!r} is listed twice")
    if "peft" not in chosen:
        raise ValueError(f"formats: {chosen} lacks 'peft', the store's own format (always written, the one "
                         "OnlineMerger.open reads back)")
    chosen = [fmt for fmt in FORMAT_FILES if fmt in chosen]
    if "gguf" not in chosen:
        for name, value in (("base", base), ("gguf_dtype", dtype)):
            if value is not None:
                raise ValueError(f"{name}: only the gguf format takes it, and the formats are {chosen}")
        return {"formats": chosen} if len(chosen) > 1 else {}
    if base is None:
        raise ValueError("base: the gguf format needs the base model: a base GGUF file, or a transformers "
                         "config.json or its folder")
    if not isinstance(base, (str, os.PathLike)):
        raise ValueError(f"base: a store keeps its base model as a path (a base GGUF file, a config.json or its "
                         f"folder), not a {type(base).__name__}")
    dtype = "f32" if dtype is None else dtype
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"gguf_dtype: unknown {dtype!r}; choose from {list(GGUF_DTYPES)}")
    path = os.path.abspath(base)
    return {"formats": chosen, "gguf": {"base": path, "dtype": dtype, **_identity(_read_base(path))}}


_BASES: dict[str, tuple[tuple, object]] = {}  # base path -> (fingerprint of the file read, formats.gguf's reading)


def _read_base(path: str):
    """formats.gguf's reading of the base model at ``path`` (re-read only when its file changed)."""
    from .formats import gguf

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        key = _fingerprint(os.stat(file))
    except OSError:
        key = None  # _resolve_base says what is wrong
    cached = _BASES.get(path)
    if key is None or cached is None or cached[0] != key:
        cached = _BASES[path] = (key, gguf._resolve_base(path))
    return cached[1]


def _identity(info) -> dict:
    return dict(zip(_GGUF_IDENTITY, (info.arch, info.head_count, info.head_count_kv, info.n_layers, info.head_dim)))


def check_slot_formats(lora: "LoRA", settings: dict, tasks: Sequence[str], where: str | os.PathLike) -> None:
    """Raise unless a slot of ``lora`` and ``tasks`` can be written in the formats of ``settings``, before
    any work: the base model is still the one ``settings.gguf`` describes (StoreError), llama.cpp and
    MLX-LM can place every module and the base GGUF has its tensor of its shape (AdapterError, naming the
    module), GGUF task names hold no comma (ValueError)."""
    from .errors import AdapterError

    formats = store_formats(settings)
    if "gguf" in formats:
        from .formats import gguf

        spec = settings["gguf"]
        info = _read_base(spec["base"])
        now = _identity(info)
        changed = [f"{key} {now[key]!r} (was {spec[key]!r})" for key in _GGUF_IDENTITY if now[key] != spec[key]]
        if changed:
            raise StoreError(f"{where}: the gguf base model {spec['base']} is not the one the store was created "
                             f"with: {', '.join(changed)}; restore it, or stream into a new store")
        for task in tasks:
            if "," in task:
                raise ValueError(f"task: {task!r} holds a comma, which a GGUF's adapter.lora.task_name cannot "
                                 "(it joins the slot's task names with ', ')")
        for key, hf, layer, rel, module in gguf._plan_modules(lora, str(where)):
            what, n_out = f"{where}: module {key!r}", int(module.B.shape[0])
            if info.n_layers is not None and layer >= info.n_layers:
                raise AdapterError(f"{what}: layer {layer}, but the base {info.source} has {info.n_layers} layers")
            gguf._check_against_base(info, gguf.gguf_tensor_name(hf), n_out, int(module.A.shape[1]), what)
            heads = gguf._heads_for(info, rel, what)
            if heads is not None:
                gguf._check_heads(n_out, heads, what)
    if "mlx" in formats:
        from .formats import mlx
        from .names import canonical_name

        bad = [key for key in lora.modules if not mlx._LAYER_RE.match(canonical_name(key))]
        if bad:
            raise AdapterError(f"{where}: MLX-LM adapters hold only modules inside decoder layers "
                               f"(model.layers.N.<path>); cannot write {bad[:3]}")


def _write_other_formats(lora: "LoRA", path: Path, settings: dict, tasks: Sequence[str]) -> None:
    """The slot's files in the store's formats other than peft (written atomically, so durable)."""
    formats = store_formats(settings)
    if "gguf" in formats:
        spec = settings["gguf"]
        # The base as the config it was read as (what the GGUF's metadata and q/k permutation need): parsing
        # a real base GGUF again takes 50-100 ms an add. check_slot_formats checked this adapter's modules
        # against the file itself (tensor names and shapes) before the add's work, and the base unchanged.
        from .formats.gguf import HF_TO_GGUF_ARCH

        info = _read_base(spec["base"])
        config = {"model_type": info.arch, "num_attention_heads": info.head_count,
                  "num_key_value_heads": info.head_count_kv, "num_hidden_layers": info.n_layers,
                  "head_dim": info.head_dim} if HF_TO_GGUF_ARCH.get(info.arch) == info.arch else spec["base"]
        lora.save(path / FORMAT_FILES["gguf"][0], format="gguf", base=config, dtype=spec["dtype"],
                  task_names=list(tasks))
    if "mlx" in formats:
        lora.save(path / "mlx", format="mlx")


def _listing(path: Path) -> list[str]:
    """The entries of a slot folder, those of its subfolders as ``sub/name`` (sorted)."""
    out = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            out += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir())]
        else:
            out.append(entry.name)
    return sorted(out)


def write_slot(lora: "LoRA", path: Path, while_syncing: Callable[[], object] | None = None,
               settings: dict | None = None, tasks: Sequence[str] = ()) -> dict[str, str]:
    """Write ``lora`` as a peft adapter, and in the other formats of ``settings`` (the store's; ``tasks``
    name the slot's tasks in a GGUF), into the new, empty folder ``path`` and make it durable.

    The peft files are written in place (the folder is fresh and no manifest names
    it yet, so no per-file rename is needed), fsynced by a worker thread while
    this one hashes them and writes the other formats (both mostly wait on I/O or
    run outside the GIL), then the folder is fsynced. ``while_syncing`` runs in a
    second worker meanwhile. Returns {file name: SHA-256 hex digest} of every file
    (:func:`slot_files`).
    """
    settings = settings or {}
    expected = slot_files(store_formats(settings))
    lora.save(path, atomic=False)
    found = sorted(p.name for p in path.iterdir())
    if found != sorted(SLOT_FILES):
        raise StoreError(f"{path}: the adapter writer left {found}, expected exactly {sorted(SLOT_FILES)}")
    files = [path / name for name in SLOT_FILES]
    with ThreadPoolExecutor(2) as pool:
        synced = pool.submit(lambda: [fsync_file(p) for p in files])
        extra = pool.submit(while_syncing) if while_syncing is not None else None
        digests = {p.name: sha256(p) for p in files}
        _write_other_formats(lora, path, settings, tasks)
        synced.result()
        if extra is not None:
            extra.result()
    if len(expected) > len(SLOT_FILES):
        found = _listing(path)
        if found != sorted(expected):
            raise StoreError(f"{path}: the adapter writers left {found}, expected exactly {sorted(expected)}")
        digests.update((name, sha256(path / name)) for name in expected[len(SLOT_FILES):])
    fsync_dir(path)
    return digests


# ------------------------------------------------------------------ the manifest
def canonical_json(obj: dict) -> bytes:
    """``obj`` as canonical JSON: keys sorted, no whitespace, ASCII; floats as Python writes them, which
    parse back exactly. (Without indentation json uses its C encoder: the manifest of a full Llama
    stream, about 300 KB, encodes in 5 ms instead of 10.)"""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(manifest: dict) -> str:
    """SHA-256 hex of the canonical JSON (:func:`canonical_json`) of ``manifest`` without its ``checksum``
    field."""
    return manifest_bytes({k: v for k, v in manifest.items() if k != "checksum"})[1]


def manifest_bytes(body: dict) -> tuple[bytes, str]:
    """The manifest file for ``body`` (a manifest without ``checksum``): (its bytes, the checksum).

    The file is the canonical JSON of ``body`` plus ``checksum``, which sorts before every other
    top-level key (``_TOP_KEYS``); so the body is encoded once, for both the checksum and the file (after
    the slot's files, a commit's largest cost).
    """
    text = canonical_json(body)
    checksum = hashlib.sha256(text).hexdigest()
    return b'{"checksum":"' + checksum.encode() + b'",' + text[1:], checksum


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_finite(x: object) -> bool:
    """A JSON number (not a bool) that is finite as a float (a huge int is not: it overflows one)."""
    if not _is_number(x):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _show(x: object) -> str:
    """A short repr for a message (a field may hold anything)."""
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_manifest(manifest: object, where: str | os.PathLike,
                      check_settings: Callable[[dict], dict] | None = None) -> dict:
    """Check a parsed manifest against the schema of :data:`VERSION` and its checksum; returns it.

    Args:
        manifest: the parsed JSON.
        where: the manifest's path, for messages.
        check_settings: ``settings -> normalised settings``, raising ValueError
            ``"<field>: why"``: the check of the names only the caller knows (strategy,
            mode, similarity; the online merger passes its own). Without it the
            settings' types and ranges are checked.

    Raises:
        StoreError: ``"<where>: <field>: why"``, e.g. ``".../manifest.json: slots[1].dir: ..."``.
    """
    def fail(field: str, why: str):
        raise StoreError(f"{where}: {field}: {why}")

    def exact_keys(obj: dict, keys: tuple, prefix: str, optional: tuple = ()) -> None:
        for key in keys:
            if key not in obj:
                fail(prefix + key, "missing")
        for key in obj:
            if key not in keys and key not in optional:
                fail(prefix + str(key), "unknown field")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{where}: not a kmerge_fast store manifest")
    version = manifest.get("version")
    if not _is_int(version) or version != VERSION:
        hint = ("; its slot folders under slots/ are peft adapters that kf.LoRA.load still reads (stream them "
                "into a new store to keep using them)") if _is_int(version) and version < VERSION else ""
        raise StoreError(f"{where}: store format version {version!r}; this kmerge_fast reads {VERSION}{hint}")
    # the checksum first: an edited manifest is reported as such, whatever the edit broke
    if "checksum" not in manifest:
        fail("checksum", "missing")
    checksum = manifest["checksum"]
    if not isinstance(checksum, str) or not _HEX64.fullmatch(checksum):
        fail("checksum", f"expected a SHA-256 (64 lowercase hex digits), got {_show(checksum)}")
    if checksum != manifest_checksum(manifest):
        fail("checksum", "does not match the manifest's contents (edited or corrupted after it was written)")
    exact_keys(manifest, _TOP_KEYS, "")
    generation = manifest["generation"]
    if not _is_int(generation) or not 1 <= generation < _MAX_GENERATION:
        fail("generation", f"expected an int in [1, {_MAX_GENERATION}), got {_show(generation)}")

    settings = manifest["settings"]
    if not isinstance(settings, dict):
        fail("settings", f"expected an object, got {_show(settings)}")
    exact_keys(settings, _SETTINGS_KEYS, "settings.", _OPTIONAL_SETTINGS)
    budget = settings["budget"]
    if not _is_int(budget) or budget < 1:
        fail("settings.budget", f"expected an int >= 1, got {_show(budget)}")
    for key in ("strategy", "similarity", "mode"):
        if not isinstance(settings[key], str):
            fail(f"settings.{key}", f"expected a string, got {_show(settings[key])}")
    threshold = settings["threshold"]
    if not (threshold is None or threshold == "auto" or _is_finite(threshold)):
        fail("settings.threshold", f"expected null, 'auto' or a finite number, got {_show(threshold)}")
    if not (settings["seed"] is None or _is_int(settings["seed"])):
        fail("settings.seed", f"expected null or an int, got {_show(settings['seed'])}")
    density = settings["density"]
    if not _is_finite(density) or not 0.0 < density <= 1.0:
        fail("settings.density", f"expected a number in (0, 1], got {_show(density)}")
    if "isonorm_up_to" in settings and not (_is_int(settings["isonorm_up_to"]) and settings["isonorm_up_to"] >= 1):
        fail("settings.isonorm_up_to", f"expected an int >= 1, got {_show(settings['isonorm_up_to'])}")
    if check_settings is not None:
        try:
            normal = check_settings(dict(settings))
        except (ValueError, TypeError, ArithmeticError) as e:
            raise StoreError(f"{where}: settings.{e}") from None
        for key in _SETTINGS_KEYS:
            if normal.get(key) != settings[key] or type(normal.get(key)) is not type(settings[key]):
                fail(f"settings.{key}", f"{_show(settings[key])} is not what this kmerge_fast stores for these "
                                        f"settings ({_show(normal.get(key))})")
    strategy = settings["strategy"]
    names = slot_files(_validate_formats(settings, fail, exact_keys))

    slots = manifest["slots"]
    if not isinstance(slots, list):
        fail("slots", f"expected a list, got {_show(slots)}")
    if len(slots) > budget:
        fail("slots", f"{len(slots)} slots, more than the budget of {budget}")
    live: dict[str, int] = {}
    stored: dict[str, int] = {}   # task -> slot
    for i, slot in enumerate(slots):
        f = f"slots[{i}]"
        if not isinstance(slot, dict):
            fail(f, f"expected an object, got {_show(slot)}")
        exact_keys(slot, _SLOT_KEYS, f + ".")
        folder = slot["dir"]
        parsed = _parse_folder(folder)
        if parsed is None:
            fail(f + ".dir", f"{_show(folder)} is not a slot folder name (sNNN-gNNNNNN, a folder inside {SLOTS}/)")
        if parsed[0] != i:
            fail(f + ".dir", f"{folder!r} is a folder of slot {parsed[0]}, not of slot {i}")
        if parsed[1] > generation:
            fail(f + ".dir", f"{folder!r} is of generation {parsed[1]}, after the manifest's {generation}")
        if folder in live:
            fail(f + ".dir", f"{folder!r} is also the folder of slots[{live[folder]}]")
        live[folder] = i
        files = slot["files"]
        if not isinstance(files, dict) or sorted(files) != sorted(names):
            got = sorted(map(str, files)) if isinstance(files, dict) else _show(files)
            fail(f + ".files", f"expected a SHA-256 for exactly {sorted(names)} (the files of the formats "
                               f"{list(store_formats(settings))}), got {got}")
        for name in names:
            if not isinstance(files[name], str) or not _HEX64.fullmatch(files[name]):
                fail(f"{f}.files[{name!r}]", f"expected a SHA-256 (64 lowercase hex digits), got {_show(files[name])}")
        tasks = slot["tasks"]
        if not isinstance(tasks, list) or not tasks:
            fail(f + ".tasks", f"expected a non-empty list of task names, got {_show(tasks)}")
        for j, task in enumerate(tasks):
            if not isinstance(task, str) or not task:
                fail(f"{f}.tasks[{j}]", f"expected a non-empty string, got {_show(task)}")
            if task in stored:
                fail(f"{f}.tasks[{j}]", f"task {task!r} is also stored in slots[{stored[task]}]")
            stored[task] = i
        if not _is_int(slot["rank"]) or slot["rank"] < 1:
            fail(f + ".rank", f"expected an int >= 1, got {_show(slot['rank'])}")
        _validate_extra(slot["extra"], f + ".extra", strategy, settings["mode"], len(tasks), slot["rank"], fail)

    obsolete = manifest["obsolete"]
    if not isinstance(obsolete, list):
        fail("obsolete", f"expected a list, got {_show(obsolete)}")
    seen: set[str] = set()
    for j, folder in enumerate(obsolete):
        parsed = _parse_folder(folder)
        if parsed is None:
            fail(f"obsolete[{j}]",
                 f"{_show(folder)} is not a slot folder name (sNNN-gNNNNNN, a folder inside {SLOTS}/)")
        if folder in live:
            fail(f"obsolete[{j}]", f"{folder!r} is the live folder of slots[{live[folder]}]")
        if folder in seen:
            fail(f"obsolete[{j}]", f"{folder!r} is listed twice")
        seen.add(folder)

    history = manifest["history"]
    if not isinstance(history, list):
        fail("history", f"expected a list, got {_show(history)}")
    added, new = set(), 0
    for j, step in enumerate(history):
        f = f"history[{j}]"
        if not isinstance(step, dict):
            fail(f, f"expected an object, got {_show(step)}")
        exact_keys(step, _STEP_KEYS, f + ".")
        task, action = step["task"], step["action"]
        if not isinstance(task, str) or task not in stored:
            fail(f + ".task", f"{_show(task)} is not a stored task")
        if step["slot"] != stored[task] or not _is_int(step["slot"]):
            fail(f + ".slot", f"{_show(step['slot'])}, but task {task!r} is in slot {stored[task]}")
        if action not in ACTIONS:
            fail(f + ".action", f"{_show(action)} is not one of {list(ACTIONS)}")
        if action != "replace":
            if task in added:
                fail(f + ".task", f"task {task!r} was added twice (only 'replace' may repeat a task)")
            added.add(task)
            new += action == "new"
        sims = step["similarities"]
        if not isinstance(sims, list) or len(sims) > budget or not all(_is_number(s) for s in sims):
            fail(f + ".similarities", f"expected a list of at most {budget} numbers, got {_show(sims)}")
        seconds = step["seconds"]
        if not _is_finite(seconds) or seconds < 0:
            fail(f + ".seconds", f"expected a finite number >= 0, got {_show(seconds)}")
    if added != set(stored):
        missing = sorted(set(stored) - added)
        fail("history", f"no 'new' or 'merge' step adds the stored tasks {missing[:3]}")
    if new != len(slots):
        fail("history", f"{new} 'new' steps for {len(slots)} slots")
    return manifest


def _validate_formats(settings: dict, fail, exact_keys) -> tuple[str, ...]:
    """``settings.formats`` (optional: peft alone) and ``settings.gguf`` (there exactly when gguf is a format)."""
    formats = settings.get("formats", ["peft"])
    if (not isinstance(formats, list) or not formats or formats[0] != "peft"
            or formats != [fmt for fmt in FORMAT_FILES if fmt in formats]):  # so distinct, known, in order
        fail("settings.formats", f"expected a list of distinct formats in the order {list(FORMAT_FILES)}, peft "
                                 f"first, got {_show(formats)}")
    if ("gguf" in settings) != ("gguf" in formats):
        fail("settings.gguf", "held by the stores that write the gguf format, always and only")
    spec = settings.get("gguf")
    if spec is not None:
        if not isinstance(spec, dict):
            fail("settings.gguf", f"expected an object, got {_show(spec)}")
        exact_keys(spec, _GGUF_KEYS, "settings.gguf.")
        if not isinstance(spec["base"], str) or not os.path.isabs(spec["base"]) or "\0" in spec["base"]:
            fail("settings.gguf.base", f"expected an absolute path, got {_show(spec['base'])}")
        if spec["dtype"] not in GGUF_DTYPES:
            fail("settings.gguf.dtype", f"expected one of {list(GGUF_DTYPES)}, got {_show(spec['dtype'])}")
        if not isinstance(spec["architecture"], str) or not spec["architecture"]:
            fail("settings.gguf.architecture", f"expected a non-empty string, got {_show(spec['architecture'])}")
        for key in _GGUF_IDENTITY[1:]:
            if not (spec[key] is None or _is_int(spec[key]) and spec[key] >= 1):
                fail("settings.gguf." + key, f"expected null or an int >= 1, got {_show(spec[key])}")
    return tuple(formats)


#: The modes whose slots keep ``extra.spectrum`` / ``extra.norms`` (their combiners' ``keys``, copied so that
#: reading a manifest does not import torch; test_store_tamper checks that the copies match).
SPECTRUM_MODES = ("iso", "isonorm", "isogeo", "isoswitch")
NORMS_MODES = ("isonorm", "isogeo", "isoswitch")


def _listed(names: Sequence[str]) -> str:
    """'a', 'b' and 'c'."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(quoted) > 1 else "".join(quoted)


def _validate_extra(extra: object, f: str, strategy: str, mode: str, n_tasks: int, rank: int, fail) -> None:
    """A slot's strategy state: ``group`` (the oracle's, always and only there), ``opcm`` (OPCM's, per module),
    ``spectrum`` (:data:`SPECTRUM_MODES`, per module: ``rank`` singular values) and ``norms``
    (:data:`NORMS_MODES`, per module: the members' mean norm); the last two in every slot of two tasks or more."""
    if not isinstance(extra, dict):
        fail(f, f"expected an object, got {_show(extra)}")
    for key in extra:
        if key not in ("group", "opcm", "spectrum", "norms"):
            fail(f"{f}.{key}", "unknown field")
    merged = n_tasks > 1
    for key, modes in (("spectrum", SPECTRUM_MODES), ("norms", NORMS_MODES)):
        if (key in extra) != (mode in modes and merged):
            fail(f"{f}.{key}", f"held by the slots of two tasks or more in modes {_listed(modes)}, always and only")
    if "spectrum" in extra:
        spectrum = extra["spectrum"]
        if not isinstance(spectrum, dict) or not spectrum:
            fail(f + ".spectrum", f"expected a non-empty object (module -> singular values), got {_show(spectrum)}")
        for name, values in spectrum.items():
            if not isinstance(values, list) or len(values) != rank or \
                    not all(_is_finite(v) and v >= 0 for v in values):
                fail(f"{f}.spectrum[{name!r}]", f"expected {rank} finite numbers >= 0, got {_show(values)}")
    if "norms" in extra:
        norms = extra["norms"]
        if not isinstance(norms, dict) or sorted(norms) != sorted(extra["spectrum"]):
            fail(f + ".norms", f"expected an object with the modules of .spectrum, got {_show(norms)}")
        for name, value in norms.items():
            if not _is_finite(value) or value < 0:
                fail(f"{f}.norms[{name!r}]", f"expected a finite number >= 0, got {_show(value)}")
    if ("group" in extra) != (strategy == "oracle"):
        fail(f + ".group", "held by the slots of the 'oracle' strategy, always and only")
    group = extra.get("group")
    if not (group is None or isinstance(group, (str, int, float, bool))):
        fail(f + ".group", f"expected a JSON scalar, got {_show(group)}")
    if "opcm" in extra:
        if strategy != "opcm":
            fail(f + ".opcm", f"only the 'opcm' strategy keeps this state, not {strategy!r}")
        state = extra["opcm"]
        if not isinstance(state, dict):
            fail(f + ".opcm", f"expected an object, got {_show(state)}")
        for name, module in state.items():
            g = f"{f}.opcm[{name!r}]"
            if not isinstance(module, dict) or sorted(module) != sorted(_OPCM_KEYS):
                fail(g, f"expected an object of {list(_OPCM_KEYS)}, got {_show(module)}")
            lam, norm_sum, count = module["lambda"], module["norm_sum"], module["count"]
            if not _is_finite(lam) or lam <= 0:
                fail(g + ".lambda", f"expected a finite number > 0, got {_show(lam)}")
            if not _is_finite(norm_sum) or norm_sum < 0:
                fail(g + ".norm_sum", f"expected a finite number >= 0, got {_show(norm_sum)}")
            if not _is_int(count) or count < 1:
                fail(g + ".count", f"expected an int >= 1, got {_show(count)}")


def _read_manifest(root: Path, check_settings=None) -> tuple[bytes, dict]:
    """(the manifest's bytes, the validated manifest); reads the file once."""
    path = root / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path}: unreadable manifest ({e.strerror or e})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(f"{path}: unreadable manifest ({e})") from None
    return raw, validate_manifest(manifest, path, check_settings)


# ----------------------------------------------------------------- export targets
def _is_store_root(folder: Path) -> bool:
    """Whether ``folder`` holds a kmerge_fast store: a manifest of this format (read: its first 64 KiB),
    or the lock and slots folder of one (a store being created, or one whose manifest is damaged)."""
    try:
        with open(folder / MANIFEST, "rb") as f:
            if FORMAT.encode() in f.read(1 << 16):
                return True
    except OSError:
        pass
    return (folder / LOCK).is_file() and (folder / SLOTS).is_dir()


def enclosing_store(path: str | os.PathLike) -> Path | None:
    """The store folder that ``path`` is, or lies inside (symlinks resolved), or None."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        resolved = Path(os.path.abspath(path))
    for folder in (resolved, *resolved.parents):
        if _is_store_root(folder):
            return folder
    return None


def check_export_target(path: str | os.PathLike, overwrite: bool = False, flag: str = "overwrite=True",
                        file: bool = False) -> Path:
    """Refuse a folder an adapter must not be exported into; returns ``path`` as a Path.

    Refused, always: any path inside a store (:func:`enclosing_store`): the
    export would corrupt a live slot, or be deleted with an old one. Refused
    unless ``overwrite``: an existing folder that is not empty (its adapter
    files would be replaced), and anything at ``path`` that is not a folder.
    ``flag`` names the way to say ``overwrite`` in the message (the CLI's ``--force``).
    ``file=True`` (a GGUF): ``path`` names a file; refused are a folder there, and
    an existing file unless ``overwrite``.
    """
    target = Path(path)
    store = enclosing_store(target)
    if store is not None:
        raise StoreError(f"{target}: inside the kmerge_fast store {store}; an export there would corrupt the "
                         "store or be deleted by it: export to a folder outside the store")
    if file:
        if target.is_dir():
            raise StoreError(f"{target}: is a folder; a GGUF adapter is one file (name it, e.g. slot3.gguf)")
        if os.path.lexists(target) and not overwrite:
            raise StoreError(f"{target}: exists; refusing to overwrite it ({flag} replaces it)")
        return target
    if os.path.lexists(target):
        if not target.is_dir():
            raise StoreError(f"{target}: exists and is not a folder")
        entries = sorted(p.name for p in target.iterdir())
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise StoreError(f"{target}: not empty (holds {shown}); refusing to overwrite it ({flag} writes the "
                             "adapter's files over the ones there)")
    return target


def export_adapter(lora: "LoRA", path: str | os.PathLike, overwrite: bool = False, format: str = "peft",
                   tasks: Sequence[str] | None = None, settings: dict | None = None, flag: str = "overwrite=True",
                   **options) -> Path:
    """Write a store's slot ``lora`` (holding ``tasks``) to ``path`` in ``format``, after
    :func:`check_export_target`; returns the path written.

    ``format="gguf"``: ``options`` are :func:`~kmerge_fast.formats.gguf.save_gguf`'s; ``base``,
    ``dtype`` default to the store's (``settings.gguf``, dtype f32 for a store without one),
    ``task_names`` to ``tasks``. ``"mlx"``: :func:`~kmerge_fast.formats.mlx.save_mlx`'s options.
    ``"peft"``: none.
    """
    from .formats import check_format

    format = check_format(format)
    if format != "gguf":
        target = check_export_target(path, overwrite, flag)
        lora.save(target, format=format, **({"overwrite": True} if format == "mlx" else {}), **options)
        return target
    spec = (settings or {}).get("gguf") or {}
    options.setdefault("dtype", spec.get("dtype", "f32"))
    options.setdefault("task_names", list(tasks) if tasks else None)
    if options.get("base") is None:
        if "base" not in spec:
            raise ValueError("base: the gguf format needs the base model (a base GGUF file, or a transformers "
                             "config.json or its folder); the store has none")
        options["base"] = spec["base"]
    target = check_export_target(path, overwrite, flag, file=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    lora.save(target, format="gguf", overwrite=True, **options)
    return target


# ---------------------------------------------------------------------- the store
class _Superseded(Exception):
    """Internal: a reader's manifest was replaced, and the folders it named removed, while it read them."""


def _tree(files: Sequence[str]) -> dict[str, set[str]]:
    """A slot's files by folder: ``{"": names in the slot folder, "mlx": names in mlx/}``."""
    tree: dict[str, set[str]] = {"": set()}
    for name in files:
        sub, _, base = name.rpartition("/")
        tree.setdefault(sub, set()).add(base)
    return tree


def _ours(entry: os.DirEntry, names: set[str], temps: set[str]) -> bool:
    """Whether ``entry`` is a regular file named in ``names``, or an atomic_write temporary of one in ``temps``."""
    if not entry.is_file(follow_symlinks=False):
        return False
    match = _ATOMIC_TMP.fullmatch(entry.name)
    return entry.name in names or match is not None and match[1] in temps


def _only_slot_files(path: str, files: Sequence[str] = SLOT_FILES) -> bool:
    """Whether ``path`` is a real folder (not a link) holding nothing but regular files named in ``files``
    (a store's slot files, :func:`slot_files`) and the temporaries of those not of peft, their
    subfolders (``mlx/``) real folders holding nothing else."""
    tree, temps = _tree(files), _tree([f for f in files if f not in SLOT_FILES])
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        with os.scandir(path) as entries:
            for e in entries:
                if e.name in tree and e.name and e.is_dir(follow_symlinks=False):
                    with os.scandir(e.path) as inside:
                        if not all(_ours(i, tree[e.name], temps.get(e.name, set())) for i in inside):
                            return False
                elif not _ours(e, tree[""], temps[""]):
                    return False
        return True
    except OSError:
        return False


def _remove_slot_folder(path: Path, files: Sequence[str] = SLOT_FILES) -> None:
    """Delete a slot folder this store wrote: the files of its formats (and their temporaries, as
    :func:`_only_slot_files` says), its subfolders, then the folder, each of which must then be empty.
    Anything else found inside stays, and so does its folder; errors are ignored (the folder stays
    listed as obsolete while it exists, and a later commit or writer tries again)."""
    tree, temps = _tree(files), _tree([f for f in files if f not in SLOT_FILES])
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return  # replaced by a link or a file: not what this store wrote
        for sub in sorted(tree, reverse=True):  # subfolders first, the slot folder ("") last
            folder = path / sub
            try:
                if sub and not stat.S_ISDIR(os.lstat(folder).st_mode):
                    continue
                with os.scandir(folder) as entries:
                    doomed = [e.path for e in entries if _ours(e, tree[sub], temps.get(sub, set()))]
            except FileNotFoundError:
                continue
            for doomed_path in doomed:
                try:
                    os.unlink(doomed_path)
                except FileNotFoundError:
                    pass
            if sub:
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # holds something else: it stays, and so does the slot folder
        os.rmdir(path)
    except OSError:
        pass


def _check_new_root(root: Path) -> None:
    """Refuse to create a store in ``root`` unless it is missing or empty (or holds only the debris of a
    store creation killed before its first manifest: the lock file, an empty ``slots/``, manifest temps)."""
    if os.path.lexists(root / MANIFEST):
        raise StoreError(f"{root}: already holds a store (open it with OnlineMerger.open)")
    if not os.path.lexists(root):
        return
    if not root.is_dir():
        raise StoreError(f"{root}: exists and is not a folder")

    def ours(entry: os.DirEntry) -> bool:
        if entry.name == LOCK or _MANIFEST_TMP.fullmatch(entry.name):
            return entry.is_file(follow_symlinks=False)
        if entry.name == SLOTS and entry.is_dir(follow_symlinks=False):
            with os.scandir(entry.path) as inside:
                return next(inside, None) is None
        return False

    with os.scandir(root) as entries:
        foreign = sorted(e.name for e in entries if not ours(e))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StoreError(f"{root}: not empty and not a kmerge_fast store (holds {shown}); a store is created only "
                         "in a missing or empty folder, so that it never deletes what it did not write")


def _remove_stale_temps(root: Path) -> None:
    """Remove the manifest temp files a killed writer left (this store's own temp names only)."""
    with os.scandir(root) as entries:
        stale = [e.path for e in entries if _MANIFEST_TMP.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    for path in stale:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Store:
    """The files of an online merger's state: one writer at a time (an exclusive flock), any number of
    readers (no lock; module docstring).

    Use :meth:`create` or :meth:`open`; :meth:`load_slots` reads slots, verified;
    :meth:`commit` writes a new state; :meth:`close` releases the lock.

    Attributes:
        root: the store folder.
        manifest: the last committed manifest (a reader's: the one it read last).
        readonly: whether opened as a reader.
    """

    def __init__(self, root: Path, lock_fd: int | None, manifest: dict, raw: bytes | None = None,
                 readonly: bool = False, check_settings: Callable[[dict], dict] | None = None):
        self.root = root
        self.readonly = readonly
        self.manifest = manifest
        self._raw = raw                      # the manifest's bytes as read (a reader compares them to retry)
        self._lock_fd = lock_fd
        self._open = True
        self._check_settings = check_settings
        self._cleaner: ThreadPoolExecutor | None = None  # deletes obsolete slot folders
        self._fingerprints: dict[str, tuple] = {}  # "dir/name" -> _fingerprint of the file as verified
        self._orphans: set[str] = set()      # folders this store wrote that no manifest names (failed commits)
        self._next_generation = manifest["generation"] + 1
        self._broken: str | None = None      # why this store refuses to commit until reopened
        self.formats = store_formats(manifest["settings"])  # the formats of every slot (settings never change)
        self.files = slot_files(self.formats)             # the files of every slot folder

    # ----------------------------------------------------------- open / create
    @staticmethod
    def _lock(root: Path) -> int:
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"{root}: cannot open the lock {root / LOCK} for writing ({e.strerror or e}); "
                             "to read the store, open it read-only") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{root}: the store is open by another writer (lock {root / LOCK} is held)") from None
        return fd

    @classmethod
    def create(cls, root: str | os.PathLike, settings: dict) -> "Store":
        """Start an empty store in ``root``: a missing or empty folder (created). Locked for writing."""
        root = Path(root)
        _check_new_root(root)
        root.mkdir(parents=True, exist_ok=True)
        fd = cls._lock(root)
        try:
            _check_new_root(root)  # again under the lock: a concurrent create may have won
            store = cls(root, fd, {"format": FORMAT, "version": VERSION, "generation": 0, "settings": settings,
                                   "slots": [], "obsolete": [], "history": []})
        except BaseException:
            os.close(fd)
            raise
        try:
            _remove_stale_temps(root)
            store.commit({}, [], [])
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, root: str | os.PathLike, readonly: bool = False, verify: bool = True,
             check_settings: Callable[[dict], dict] | None = None) -> "Store":
        """Open an existing store.

        Args:
            root: the store folder.
            readonly: open as a reader: no lock, nothing written (module docstring,
                "Readers"). A writer (the default) takes the exclusive lock and removes
                what killed writers and interrupted commits left (module docstring).
            verify: check the SHA-256 of every slot file now (:meth:`load_slots`
                checks the bytes it uses in any case).
            check_settings: see :func:`validate_manifest`.

        Raises:
            StoreError: not a store, a manifest or file that is corrupt or was
                modified, another writer holds the lock (writers only).
        """
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise StoreError(f"{root}: no store here ({MANIFEST} is missing)")
        if readonly:
            verified: set[str] = set()
            for _ in range(READ_ATTEMPTS):
                raw, manifest = _read_manifest(root, check_settings)
                store = cls(root, None, manifest, raw, readonly=True, check_settings=check_settings)
                try:
                    if verify:
                        store.verify(verified)
                    return store
                except _Superseded:
                    continue
            raise StoreError(store._too_busy())
        fd = cls._lock(root)
        try:
            raw, manifest = _read_manifest(root, check_settings)
            store = cls(root, fd, manifest, raw, check_settings=check_settings)
        except BaseException:
            os.close(fd)
            raise
        try:
            if verify:
                store.verify()
            store._clean()
        except BaseException:
            store.close()
            raise
        return store

    def _clean(self) -> None:
        """A writer's cleanup at open: stale manifest temps, obsolete folders, interrupted commits' leftovers
        (module docstring); also sets the next generation above every slot folder's."""
        _remove_stale_temps(self.root)
        slots_root = self.root / SLOTS
        if not slots_root.is_dir():
            return
        generation = self.manifest["generation"]
        obsolete = set(self.manifest["obsolete"])
        doomed, newest = [], generation
        with os.scandir(slots_root) as entries:
            for entry in entries:
                parsed = _parse_folder(entry.name)
                if parsed is None:
                    continue
                if parsed[1] < _MAX_GENERATION:
                    newest = max(newest, parsed[1])
                if entry.name in obsolete or parsed[1] > generation and _only_slot_files(entry.path, self.files):
                    doomed.append(entry.name)
        self._next_generation = newest + 1
        if doomed:
            # recorded in the next manifest, should the removal fail
            self._orphans.update(d for d in doomed if d not in obsolete)
            fsync_dir(self.root)  # the manifest that names none of them must be durable before they go
            self._remove_folders(doomed)

    def close(self) -> None:
        """Wait for pending deletions, then release the writer lock (idempotent)."""
        if self._cleaner is not None:
            self._cleaner.shutdown(wait=True)
            self._cleaner = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._open = False

    def wait(self) -> None:
        """Wait for the deletions queued so far."""
        if self._cleaner is not None:
            self._cleaner.submit(lambda: None).result()  # one worker: runs after every earlier task

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def generation(self) -> int:
        """The generation of :attr:`manifest`: it changes exactly when a commit took place."""
        return self.manifest["generation"]

    # --------------------------------------------------------------- contents
    def slot_dir(self, index: int) -> Path:
        return self.root / SLOTS / self._slot(index)["dir"]

    def _slot(self, index: int) -> dict:
        slots = self.manifest["slots"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(slots):
            raise ValueError(f"slot: no slot {index!r}; the store at {self.root} has {len(slots)}")
        return slots[index]

    def load_slot(self, index: int) -> "LoRA":
        """The adapter of slot ``index``, as last committed (:meth:`load_slots`)."""
        return self.load_slots([index])[0]

    def load_slots(self, indices: Sequence[int] | None = None) -> list["LoRA"]:
        """The adapters of slots ``indices`` (default: all), as last committed.

        Each file is read once into memory, its SHA-256 checked against the
        manifest, and those same bytes parsed: the adapters never depend on the
        files afterwards. A reader whose manifest a writer replaced meanwhile
        (and whose folders it removed) re-reads the manifest and tries again, up
        to :data:`READ_ATTEMPTS` times, reading only the slots whose folder
        changed (a commit changes one); :attr:`manifest` is then the newer one.

        Raises:
            StoreError: a file is missing or does not match its checksum.
        """
        from .lora import LoRA

        self._check_open()
        done: dict[str, LoRA] = {}  # folder -> its adapter, kept across attempts (a folder never changes)
        for _ in range(READ_ATTEMPTS):
            wanted = range(len(self.manifest["slots"])) if indices is None else indices
            try:
                for index in wanted:
                    slot = self._slot(index)
                    if slot["dir"] not in done:
                        config, weights = (self._read_verified(slot, name, keep=True) for name in SLOT_FILES)
                        for name in self.files[len(SLOT_FILES):]:  # the other formats: checked, never parsed
                            self._read_verified(slot, name, keep=False)
                        done[slot["dir"]] = LoRA.load_bytes(config, weights, str(self.root / SLOTS / slot["dir"]))
                return [done[self._slot(index)["dir"]] for index in wanted]
            except _Superseded:
                self._raw, self.manifest = _read_manifest(self.root, self._check_settings)
        raise StoreError(self._too_busy())

    def verify(self, _done: set[str] | None = None) -> None:
        """Check the SHA-256 of every file the manifest names (streamed; StoreError on a mismatch)."""
        self._check_open()
        done = set() if _done is None else _done  # folders verified (by an earlier attempt of a reader)
        for slot in self.manifest["slots"]:
            if slot["dir"] not in done:
                for name in self.files:
                    self._read_verified(slot, name, keep=False)
                done.add(slot["dir"])

    def _read_verified(self, slot: dict, name: str, keep: bool) -> bytes | None:
        path = self.root / SLOTS / slot["dir"] / name
        try:
            digest, data, before, after = _read_file(path, keep)
        except FileNotFoundError:
            if self.readonly and self._manifest_replaced():
                raise _Superseded from None
            raise StoreError(f"{path}: missing (named by {self.root / MANIFEST})") from None
        except OSError as e:
            raise StoreError(f"{path}: unreadable ({e.strerror or e})") from None
        if digest != slot["files"][name]:
            raise StoreError(f"{path}: checksum mismatch (corrupt or modified since it was written)")
        if not self.readonly:
            if before != after:
                raise StoreError(f"{path}: modified while being read")
            self._fingerprints[f"{slot['dir']}/{name}"] = before
        return data

    def _manifest_replaced(self) -> bool:
        try:
            return (self.root / MANIFEST).read_bytes() != self._raw
        except OSError:
            return False

    def _too_busy(self) -> str:
        return (f"{self.root}: a writer replaced the manifest {READ_ATTEMPTS} times while this reader read the "
                "slots it named; try again")

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError(f"{self.root}: the store is closed")

    def check_adapter(self, lora: "LoRA", tasks: Sequence[str]) -> None:
        """Raise unless a slot of ``lora`` holding ``tasks`` can be written in this store's formats
        (:func:`check_slot_formats`); nothing to check for a store of peft alone."""
        if len(self.formats) > 1:
            check_slot_formats(lora, self.manifest["settings"], tasks, self.root)

    def check_writable(self) -> None:
        """Raise StoreError unless this store may commit: open, for writing, and in step with its disk."""
        self._check_open()
        if self.readonly:
            raise StoreError(f"{self.root}: opened read-only; open it for writing to change it")
        if self._broken is not None:
            raise StoreError(f"{self.root}: {self._broken}; reopen the store")

    def _check_unchanged(self) -> None:
        """StoreError unless every file the manifest names is the one verified or written
        (by stat; a file whose stat changed is re-hashed)."""
        for slot in self.manifest["slots"]:
            for name in self.files:
                key, path = f"{slot['dir']}/{name}", self.root / SLOTS / slot["dir"] / name
                try:
                    now = _fingerprint(os.stat(path))
                    if self._fingerprints.get(key) == now:
                        continue
                    digest = sha256(path)
                except FileNotFoundError:
                    raise StoreError(f"{path}: missing (named by {self.root / MANIFEST}); deleted since the store "
                                     "was opened") from None
                except OSError as e:
                    raise StoreError(f"{path}: unreadable ({e.strerror or e})") from None
                if digest != slot["files"][name]:
                    raise StoreError(f"{path}: checksum mismatch: modified since the store verified it; refusing to "
                                     "commit over a damaged store (restore the file, or export the slots this "
                                     "merger holds in memory)")
                self._fingerprints[key] = now

    # ----------------------------------------------------------------- commit
    def commit(self, changed: dict[int, "LoRA"], slot_meta: list[dict], history: list[dict],
               while_syncing: Callable[[], object] | None = None) -> None:
        """Write a new state atomically.

        Args:
            changed: slot index -> adapter, for the slots whose factors changed
                (a new index appends a slot).
            slot_meta: per slot (all of them, in order) a JSON-able dict of
                metadata (``tasks``, ``rank``, ``extra``) stored in the manifest.
            history: the full JSON-able history list.
            while_syncing: optional callable, run in a worker thread while the
                first changed slot's files are fsynced (the CPU is mostly idle
                then); not run when no slot changed. Its exception fails the commit.

        The manifest's rename is the commit point. On an error before it the
        disk's state and :attr:`manifest` stay as they were (the folders this
        commit wrote are deleted after the next one). On an error after it the
        exception still propagates, but :attr:`manifest` (and :attr:`generation`)
        is the new state, which the disk holds. Raises StoreError before writing
        anything if a file the manifest names changed since it was verified.
        """
        self.check_writable()
        self._check_unchanged()
        generation = self._next_generation
        self._next_generation += 1  # never reused, even if this commit fails
        slots_root = self.root / SLOTS
        old = self.manifest["slots"]
        created: list[str] = []
        try:
            slots_root.mkdir(exist_ok=True)
            entries, prints = [], {}
            for index, meta in enumerate(slot_meta):
                if index not in changed:
                    entries.append({"dir": old[index]["dir"], "files": old[index]["files"], **meta})
                    continue
                folder = slot_folder(index, generation)
                created.append(folder)  # before the mkdir: an interrupt right after it must not lose the record
                try:
                    (slots_root / folder).mkdir()  # never exist_ok: only a folder made here is this commit's
                except FileExistsError:
                    created.pop()
                    raise
                files = write_slot(changed[index], slots_root / folder, while_syncing, self.manifest["settings"],
                                   meta["tasks"])
                while_syncing = None  # once
                for name in files:
                    prints[f"{folder}/{name}"] = _fingerprint(os.stat(slots_root / folder / name))
                entries.append({"dir": folder, "files": files, **meta})
            fsync_dir(slots_root)
            live = {entry["dir"] for entry in entries}
            gone = set(self.manifest["obsolete"]) | {slot["dir"] for slot in old} | self._orphans
            obsolete = sorted(d for d in gone - live if os.path.lexists(slots_root / d))
            body = {k: v for k, v in self.manifest.items() if k != "checksum"}
            body.update(generation=generation, slots=entries, obsolete=obsolete, history=history)
            data, checksum = manifest_bytes(body)
            self._replace_manifest({**body, "checksum": checksum}, data, prints)
        except BaseException:
            if self.generation != generation:  # not committed: what it wrote goes after the next commit
                self._orphans.update(created)
            raise

    def _replace_manifest(self, manifest: dict, data: bytes, prints: dict[str, tuple]) -> None:
        """Write ``data`` (``manifest``'s file, :func:`manifest_bytes`) to a temporary file, fsync it, rename
        it over the manifest (the commit point), fsync the store folder, then queue the deletion of the
        folders it lists as obsolete."""
        fd, tmp = self._new_temp()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.root / MANIFEST)
        except BaseException:
            if self._renamed(tmp):  # the error came after the rename: committed
                self._committed(manifest, data, prints)
            raise
        self._committed(manifest, data, prints)
        fsync_dir(self.root)  # on an error: committed but perhaps not durable, so nothing is deleted yet
        self._remove_folders(manifest["obsolete"])

    def _new_temp(self) -> tuple[int, Path]:
        """A new temporary manifest file (created exclusively, umask permissions): (fd, path)."""
        while True:
            path = self.root / f".{MANIFEST}.{os.urandom(8).hex()}.tmp"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
            except FileExistsError:
                continue

    def _renamed(self, tmp: Path) -> bool:
        """After an error in :meth:`_replace_manifest`: whether the rename took place (only it moves ``tmp``
        away). If that cannot be told, the store refuses further commits until reopened."""
        try:
            os.lstat(tmp)
        except FileNotFoundError:
            return True
        except BaseException:
            self._broken = "an error interrupted a commit at its rename, and whether it took place is unknown"
            return False
        try:
            os.unlink(tmp)
        except OSError:
            pass  # a stale temp: the next writer removes it
        return False

    def _committed(self, manifest: dict, raw: bytes, prints: dict[str, tuple]) -> None:
        self.manifest, self._raw = manifest, raw
        live = {slot["dir"] for slot in manifest["slots"]}
        self._orphans -= live | set(manifest["obsolete"])
        self._fingerprints.update(prints)
        self._fingerprints = {k: v for k, v in self._fingerprints.items() if k.split("/", 1)[0] in live}

    def _remove_folders(self, names: Sequence[str]) -> None:
        """Queue the deletion of these slot folders (this store's) in the background thread.

        Deleting a large file can take milliseconds (the filesystem may discard
        its blocks), time a commit need not wait for.
        """
        if not names:
            return
        if self._cleaner is None:
            self._cleaner = ThreadPoolExecutor(1, thread_name_prefix="kmerge-store-cleanup")
        paths, files = [self.root / SLOTS / name for name in names], self.files
        self._cleaner.submit(lambda: [_remove_slot_folder(p, files) for p in paths])
