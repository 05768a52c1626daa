"""Find files of a Hugging Face model repository in the local hub cache, and download them only when asked.

The cache layout is the one `huggingface_hub` writes (and SAELens reads through it):

    $HF_HUB_CACHE/models--ORG--NAME/refs/REVISION          # the commit a branch or tag points at
    $HF_HUB_CACHE/models--ORG--NAME/snapshots/COMMIT/PATH  # each file of that commit

with HF_HUB_CACHE defaulting to $HF_HOME/hub, and HF_HOME to $XDG_CACHE_HOME/huggingface or
~/.cache/huggingface. Resolution reads the environment at call time and never touches the network, so an
import works offline whenever the files are cached; `download=True` fetches what is missing with
`huggingface_hub.hf_hub_download` into the same cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubFilesMissing(FileNotFoundError):
    """Files a repository needs that are neither in the cache nor downloadable now; the message says how to get them."""


def hub_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """HF_HUB_CACHE (or its old name HUGGINGFACE_HUB_CACHE), else HF_HOME/hub, else the default under ~/.cache."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(name):
            return Path(environ[name]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    base = Path(environ["XDG_CACHE_HOME"]).expanduser() if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hugging Face repository id; expected ORG/NAME")
    return repo_id


def snapshot_dir(cache: Path, repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot of `revision` (a branch, tag or commit), or None when the cache has none."""
    repo = cache / f"models--{check_repo_id(repo_id).replace('/', '--')}"
    if COMMIT.match(revision) and (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    ref = repo / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return repo / "snapshots" / commit if COMMIT.match(commit) and (repo / "snapshots" / commit).is_dir() else None


def cached_file(cache: Path, repo_id: str, filename: str, revision: str = "main") -> Path | None:
    snapshot = snapshot_dir(cache, repo_id, revision)
    if snapshot is None or filename.startswith("/") or ".." in Path(filename).parts:
        return None
    path = snapshot / filename
    return path if path.is_file() else None


def resolve_files(repo_id: str, filenames: Sequence[str], *, revision: str = "main", download: bool = False,
                  environ: Mapping[str, str] = os.environ) -> dict[str, Path]:
    """{filename: local path} for files of `repo_id`, from the cache; with `download`, fetch the missing ones."""
    cache = hub_cache_dir(environ)
    found = {name: cached_file(cache, repo_id, name, revision) for name in filenames}
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        listed = ", ".join(f"{repo_id}/{name}" for name in missing)
        raise HubFilesMissing(
            f"not in the Hugging Face cache {cache} (revision {revision}): {listed}. Pass --download to fetch "
            f"them (needs network access to the hub), or fetch them yourself with `huggingface-cli download "
            f"{repo_id} {' '.join(missing)}`, or point HF_HUB_CACHE / HF_HOME at a cache that holds them")
    for name in missing:
        found[name] = _download(repo_id, name, revision, cache, environ)
    return {name: path for name, path in found.items() if path is not None}


def _download(repo_id: str, filename: str, revision: str, cache: Path, environ: Mapping[str, str]) -> Path:
    if environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubFilesMissing(f"cannot download {repo_id}/{filename}: HF_HUB_OFFLINE is set; unset it or put the "
                              f"file in the cache {cache}")
    from huggingface_hub import hf_hub_download  # imported only when a download is asked for

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=str(cache)))
    except Exception as exc:  # network, authentication, missing repo or file: all end the import the same way
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise HubFilesMissing(f"could not download {repo_id}/{filename} (revision {revision}) into {cache}: "
                              f"{reason}. Check the repository id, file and network access (gated repositories "
                              "also need `huggingface-cli login`)") from None
