"""Finding a model in the local Hugging Face hub cache, offline, as transformers does.

The cache (``huggingface_hub``'s layout) holds one folder per repository,
``models--ORG--NAME``, with ``refs/main`` naming the revision whose files are in
``snapshots/<rev>/`` (links into ``blobs/``). :func:`resolve_model_folder` turns a hub id
(``org/name``) or such a repository folder into that snapshot folder. loracc never downloads: an
id that is not in the cache is an error that says where it looked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loracc.errors import InputError
from loracc.io.inputs import open_input

__all__ = ["hub_cache_dirs", "is_hub_id", "resolve_model_folder"]

# A hub id: "org/name" (letters, digits, "-", "_", "."), neither part starting with a dot.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")


def hub_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps its cache, in its own order of precedence: ``HF_HUB_CACHE``,
    ``HF_HOME/hub``, then ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/huggingface/hub``."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return [Path(env["HF_HUB_CACHE"]).expanduser()]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]).expanduser() / "hub"]
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return [cache.expanduser() / "huggingface" / "hub"]


def is_hub_id(text: str) -> bool:
    return _HUB_ID.fullmatch(text) is not None


def _is_repo_folder(path: Path) -> bool:
    return path.name.startswith("models--") and (path / "snapshots").is_dir()


def _snapshot(repo: Path) -> Path:
    """The snapshot ``refs/main`` names, or the only snapshot when there is no ``refs/main``."""
    ref = repo / "refs" / "main"
    if ref.exists():
        with open_input(ref) as f:  # a revision hash: 40 hex digits
            rev = f.read(256).decode("utf-8", errors="replace").strip()
        snap = repo / "snapshots" / rev
        if rev in ("", ".", "..") or "/" in rev or "\0" in rev or not snap.is_dir():
            raise InputError(f"{ref}: names revision '{rev}', which has no snapshots/ folder")
        return snap
    snaps = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if len(snaps) == 1:
        return snaps[0]
    names = ", ".join(p.name for p in snaps) or "none"
    raise InputError(
        f"{repo}: a hub-cache repository without refs/main and with {len(snaps)} snapshots "
        f"({names}); give one of them: {repo / 'snapshots' / '<rev>'}"
    )


def resolve_model_folder(spec: str | os.PathLike[str], flag: str) -> Path:
    """The folder ``spec`` means: a hub-cache repository folder gives its ``refs/main`` snapshot,
    a hub id not found on disk gives its snapshot in the local cache; any other path is returned
    as it is (its reader says what is wrong with it). ``flag`` names the option in messages."""
    path = Path(spec)
    if path.is_dir():
        return _snapshot(path) if _is_repo_folder(path) else path
    if path.exists() or path.is_symlink() or not is_hub_id(str(spec)):
        return path
    repo_name = "models--" + str(spec).replace("/", "--")
    looked = [d / repo_name for d in hub_cache_dirs()]
    for repo in looked:
        if repo.is_dir():
            return _snapshot(repo)
    where = ", ".join(str(p) for p in looked)
    raise InputError(
        f"{flag} {spec}: no such folder, and not in the local Hugging Face cache (looked for "
        f"{where}; set HF_HUB_CACHE or HF_HOME to another cache); loracc does not download: "
        f"run `hf download {spec}` or give the model's folder"
    )
