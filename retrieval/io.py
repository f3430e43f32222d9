"""Atomic writers for everything a later stage reads, strict JSON, JSON lines, rank files, and the checks that
an output file or folder can be written (before any work is done). The hand-off file itself is handoff.py's.

Every writer writes a temp file next to its target and renames it into place, so a reader never sees half a
file, and an OSError while writing (a full disk, a read-only folder) is one UserError naming the file, with
an earlier file there left unchanged.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from retrieval.errors import UserError

# A writer touches its temp file while writing and renames it seconds to minutes after creating it, so a
# hand-off temp file unchanged for an hour belongs to a killed run. Any matching temp file could also be
# a live write of the same output by a second job (e.g. two --overwrite runs), which must not be broken.
STALE_TEMP_AGE_S = 3600


class HandoffError(UserError):
    """A hand-off file is missing, malformed or violates the schema. str() names the file."""


# ----------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds.

    A reader never sees a half-written file, and a crash leaves the old file (if any) untouched.
    An OSError while making the folder, writing or renaming (disk full, read-only or missing folder, a
    file where a folder should be) becomes one UserError naming `path` (write_failed); the temp file is
    removed either way.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Keep the extension last so libraries that dispatch on it (h5py, numpy, matplotlib) still work.
    stem, ext = os.path.splitext(os.path.basename(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
        os.close(fd)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        yield tmp
        # mkstemp makes 0600 files; give the result the permissions a plain open() would (umask),
        # so collaborators on a shared cluster can read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_failed(path: str | os.PathLike, error: OSError) -> UserError:
    """The UserError for an OSError while writing `path`: '<path>: cannot write (No space left on device)'.
    The reason is the OS's own words without the errno and file names, which would repeat the path. h5py
    gives no errno but a paragraph holding 'errno = 28': its number is read from there."""
    if error.errno and error.strerror and "\n" not in error.strerror:
        reason = error.strerror
    else:
        number = next((int(m) for m in re.findall(r"errno = (\d+)", str(error))), None)
        reason = os.strerror(number) if number else (str(error).splitlines() or [type(error).__name__])[0]
    return UserError(f"{os.fspath(path)}: cannot write ({reason}); an earlier file there is left unchanged")


def temp_glob(path: str | os.PathLike) -> str:
    """The glob (relative to path's folder) of the temp names atomic_path gives writes of `path`:
    .<stem>.<8 random characters of mkstemp>.tmp<ext> (exactly 8, so 'a.b.h5' temps never match 'a.h5')."""
    stem, ext = os.path.splitext(os.path.basename(os.fspath(path)))
    return f".{glob.escape(stem)}.{'[a-z0-9_]' * 8}.tmp{glob.escape(ext)}"


def remove_stale_temps(folder: str | os.PathLike, patterns: Iterable[str], older_than_s: float) -> list[str]:
    """Delete the files in `folder` matching any glob in `patterns` unchanged for more than older_than_s
    seconds: temp files of atomic writes whose process was killed. Returns the paths removed."""
    now, removed = time.time(), []
    for pattern in patterns:
        for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), pattern)):
            try:
                if now - os.path.getmtime(path) > older_than_s:
                    os.remove(path)
                    removed.append(path)
            except OSError:  # renamed or removed by its writer meanwhile: not ours to report
                pass
    return removed


def require_writable(folder: str | os.PathLike, flag: str) -> str:
    """Raise UserError unless files can be written in `folder`, before any slow work starts.

    A missing folder is not made here (a run that then fails on its input leaves nothing behind): a
    file is made and removed in its nearest existing parent instead, which proves the folder can be made.
    """
    folder = os.fspath(folder)
    reason = _unwritable(folder)
    if reason:
        raise UserError(f"{folder}: not writable ({reason}); choose another output folder with {flag}")
    return folder


def require_output_file(path: str | os.PathLike, flag: str) -> str:
    """Raise UserError unless a file can be written at `path` (not a folder, its folder writable), before
    any slow work starts: the check for a file flag such as --output_path, as require_writable for folders."""
    path = os.fspath(path)
    reason = f"{path} is a folder" if os.path.isdir(path) else _unwritable(os.path.dirname(os.path.abspath(path)))
    if reason:
        raise UserError(f"{path}: cannot be written ({reason}); choose another file with {flag}")
    return path


def _unwritable(folder: str) -> str | None:
    """Why no file can be made in `folder` (or in the folders leading to it), or None when one can."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if existing != os.path.abspath(folder) and os.path.isdir(existing):
            reason = f"cannot make folders in {existing}: {reason}"
        return reason
    return None


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write strict JSON (numpy scalars/arrays converted).

    NaN and infinity raise ValueError naming the file and where the value sits, and nothing is written:
    Python's NaN / Infinity tokens are not JSON (other readers reject the file), and what an undefined
    number means (null, with a reason beside it) is for the code that computed it to say.
    """
    try:
        text = json.dumps(obj, indent=2, default=json_default, allow_nan=False)
    except ValueError:
        found = _non_finite(obj)
        if found is None:
            raise  # another fault (a circular reference): json's own message says which
        where, value = found
        raise ValueError(f"{path}: {where or 'the value'} is {value}, which strict JSON cannot hold; the code "
                         "that computed it must write null (with a reason) instead") from None
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")


def _non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """(path such as 'groups[0].value', value) of the first NaN / infinity in obj as json would write it, or None."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, dict):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple, set)):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        value = float(obj) if isinstance(obj, (float, np.floating)) else 0.0
        return None if math.isfinite(value) else (where, value)
    return next(filter(None, (_non_finite(value, path) for path, value in items)), None)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to a log (a log is appended to, not rewritten, so it is not atomic).

    A write that fails part-way (disk full) is cut back off, so the log keeps its earlier lines byte for
    byte and never ends in half a line; the failure is write_failed's UserError.
    """
    line = json.dumps(record, default=json_default, allow_nan=False) + "\n"   # strict, as write_json
    path = os.fspath(path)
    size = os.path.getsize(path) if os.path.isfile(path) else None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        _cut_back(path, size)
        raise write_failed(path, e) from None


def _cut_back(path: str, size: int | None) -> None:
    """Undo a failed append: truncate to the size before it (remove a file it created)."""
    with contextlib.suppress(OSError):   # best effort: the error being reported is the write's
        if size is None and os.path.isfile(path):
            os.remove(path)
        elif size is not None:
            os.truncate(path, size)


def ranks_path(json_path: str | os.PathLike) -> str:
    """<runs>/<name>.ranks.npz next to a run's <runs>/<name>.json."""
    return os.fspath(json_path)[:-len(".json")] + ".ranks.npz"


def write_ranks(path: str | os.PathLike, ranks: Mapping[str, np.ndarray], text_to_image: np.ndarray) -> None:
    """Atomically write a run's rank file: per direction the 1-based rank of each query's first relevant
    item that its R@K / MRR came from (inf = miss), and the caption -> image map resampling by image needs."""
    arrays = {direction: np.asarray(r, dtype=np.float64) for direction, r in ranks.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, text_to_image=np.asarray(text_to_image, dtype=np.int64), **arrays)


def read_ranks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{direction: ranks, "text_to_image": map} of a rank file (raises what numpy raises for a bad file)."""
    with np.load(path, allow_pickle=False) as z:
        return {key: z[key] for key in z.files}


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; invalid JSON is a HandoffError naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HandoffError(f"{path}: not valid JSON ({e})") from None


