"""Where Sa2VA weights come from: a local model folder (identified by a digest of its files) or a
Hugging Face Hub id pinned to a commit. Nothing here imports transformers or runs remote code."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import UserError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")
# Files up to this size enter the folder digest by content; larger ones (weight shards of
# gigabytes) by size and modification time, which is what a re-download or re-export changes.
CONTENT_HASH_MAX_BYTES = 16 * 2**20
DOWNLOAD_HINT = (
    "Download the weights once on a machine with internet access, e.g. "
    "`huggingface-cli download ByteDance/Sa2VA-4B --local-dir /models/Sa2VA-4B`, and pass that "
    "folder; `pip install .[sa2va]` installs the extra packages Sa2VA's remote code imports."
)


def folder_digest(folder: Path) -> str:
    """Short digest of a model folder: small files by content, large ones by size and mtime.

    Hidden entries (``.cache/`` written by ``huggingface-cli``) and ``__pycache__`` are skipped
    because they change without the model changing.
    """
    digest = hashlib.sha256()
    for path in sorted(model_files(folder)):
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        if stat.st_size <= CONTENT_HASH_MAX_BYTES:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
            digest.update(f"{relative}\0content\0{content}\n".encode())
        else:
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder, without hidden entries and ``__pycache__``."""
    files = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        if path.is_file():
            files.append(path)
    return files


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a local folder or a Hub id (+ commit)."""

    location: str
    is_local: bool
    revision: str | None

    @classmethod
    def resolve(
        cls, model_path: str | os.PathLike[str], revision: str | None, allow_unpinned: bool
    ) -> ModelSource:
        """Validate ``model_path``/``revision`` against the loading rules: a local folder is
        loaded offline; a Hub id needs a 40-hex commit ``revision`` unless ``allow_unpinned``."""
        text = os.fspath(model_path)
        path = Path(text).expanduser()
        if path.exists() or not _HUB_ID_RE.fullmatch(text):
            return cls._local(path, revision)
        if revision is not None and not COMMIT_RE.fullmatch(revision):
            raise UserError(
                f"Sa2VA revision {revision!r} for {text!r} is not a 40-hex commit id; branch and "
                "tag names can move. Pin the commit shown on the repository's "
                "'Files and versions' page."
            )
        if revision is None and not allow_unpinned:
            raise UserError(
                f"Sa2VA model {text!r} is a Hugging Face Hub id without a pinned revision: "
                "loading it would run whatever remote code the repository holds today. Pass "
                "revision='<40-hex commit>', or a local folder "
                f"(`huggingface-cli download {text} --local-dir /models/{text.split('/')[-1]}`),"
                " or set allow_unpinned_remote_code=True if you accept that risk. (If you meant "
                f"a local folder: '{path.resolve()}' does not exist.)"
            )
        return cls(location=text, is_local=False, revision=revision)

    @classmethod
    def _local(cls, path: Path, revision: str | None) -> ModelSource:
        if not path.exists():
            raise UserError(f"Sa2VA model folder '{path}' does not exist. {DOWNLOAD_HINT}")
        if not (path / "config.json").is_file():
            raise UserError(
                f"Sa2VA model folder '{path}' has no config.json, so it is not a Hugging Face "
                f"model folder (or the download is incomplete). {DOWNLOAD_HINT}"
            )
        if revision is not None:
            raise UserError(
                f"revision {revision!r} was given for the local folder '{path}'; a revision only "
                "applies to a Hub id. Drop it (the folder's file digest identifies the weights)."
            )
        return cls(location=str(path.resolve()), is_local=True, revision=None)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every ``from_pretrained`` call."""
        kwargs: dict[str, Any] = {"trust_remote_code": True, "local_files_only": self.is_local}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs

    def describe(self) -> str:
        """``folder '<path>'`` or ``Hub id '<id>'``, for messages."""
        return f"folder '{self.location}'" if self.is_local else f"Hub id {self.location!r}"


def cached_commit(repo_id: str) -> str | None:
    """The commit of the snapshot an unpinned Hub id was just loaded from (HF cache layout
    ``.../snapshots/<commit>/config.json``), so the backend id still names the weights."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        return None
    commit = Path(cached).parent.name
    return commit if COMMIT_RE.fullmatch(commit) else None
