"""Remote code that loads safely in parallel and is never shared between two checkpoints.

transformers copies a local checkpoint's code into
``HF_MODULES_CACHE/transformers_modules/<folder name>/`` and imports it as
``transformers_modules.<folder name>.<file>``. So two folders with the same name share that
module directory (and, in one process, the second gets the first one's already imported files,
e.g. its ``sam2.py``), and workers loading at once race while one copies the files another is
importing (huggingface/transformers#27421). Hub ids are kept apart by repository and commit, but
race the same way.

- :func:`code_location` is what ``from_pretrained`` is given: for a local folder, a symbolic
  link to it named ``<folder name>_<digest>``, the digest covering the folder's resolved path and
  its code and config files, so every folder (and every change of its code) gets a module
  directory of its own; for a Hub id, the id.
- :func:`code_lock` is an inter-process file lock per module directory. The loader holds it
  while transformers copies and imports the code (config, model class, tokenizer, processor);
  the weights load outside it, in parallel. Once the files are in place a later load only reads
  them (transformers compares before copying and hashes before re-importing).

Links live under ``$XDG_CACHE_HOME/sa2va-rl/checkpoint-links`` (``~/.cache`` by default); links
whose folder is gone are removed when a new one is made.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from models.sa2va.source import ModelSource

# Files whose content decides which code transformers imports.
_CODE_SUFFIXES = (".py", ".json")
_NAME_RE = re.compile(r"[^A-Za-z0-9_]")


def links_root() -> Path:
    """Where the checkpoint links and locks live."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sa2va-rl" / "checkpoint-links"


def code_location(source: ModelSource) -> str:
    """The path or id to pass to ``from_pretrained`` (see the module docstring)."""
    if not source.is_local:
        return source.location
    folder = Path(source.location)
    link = links_root() / f"{_module_name(folder.name)}_{_code_digest(folder)}"
    if not (link.is_symlink() and Path(os.readlink(link)) == folder):
        _make_link(link, folder)
    return str(link)


@contextmanager
def code_lock(location: str) -> Iterator[None]:
    """Hold the inter-process lock of the module directory of ``location`` (a
    :func:`code_location`)."""
    root = links_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / lock_name(location))):
        yield


def lock_name(location: str) -> str:
    """The lock file's name (in :func:`links_root`) for ``location``."""
    tag = hashlib.sha256(location.encode()).hexdigest()[:8]
    return f".{_module_name(Path(location).name)}-{tag}.lock"


def _code_digest(folder: Path) -> str:
    digest = hashlib.sha256(f"{folder}\n".encode())
    for path in sorted(folder.iterdir()):
        if path.suffix in _CODE_SUFFIXES and path.is_file():
            digest.update(f"{path.name}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _module_name(text: str) -> str:
    return _NAME_RE.sub("_", text)


def _make_link(link: Path, folder: Path) -> None:
    """Create ``link`` -> ``folder`` atomically (a concurrent creator makes the same link), after
    removing links whose folder is gone."""
    link.parent.mkdir(parents=True, exist_ok=True)
    for stale in link.parent.iterdir():
        if stale.is_symlink() and not stale.exists():
            stale.unlink(missing_ok=True)
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(folder, target_is_directory=True)
    os.replace(temporary, link)
