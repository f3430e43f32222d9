"""Reading a dataset's files safely: the checks every dataset reader shares, and the two caption formats
more than one dataset uses.

Every captions file is read as strict UTF-8 (a BOM allowed; read_text), and every image name in one must
be a relative path that stays inside its image folder (contained_name); a name that leaves it is skipped
like a missing image (keep_inside), so a captions file can never make a script open files elsewhere.

Bad input (a missing folder, a file that cannot be parsed at all) raises UserError("<file>: <fault>")
(fail). Single bad lines and captions naming no image are skipped, listed as skipped notes and warned
about once on stderr (warn_once).

The formats: a caption table (CSV with a header line, or JSONL; read_caption_table) and a token file
('<image>#<n><TAB><caption>' lines, as Flickr8k.token.txt; read_flickr8k_tokens).
"""
from __future__ import annotations

import codecs
import csv
import json
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from retrieval.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a data warning to stderr once per process (load_split runs once per split)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def fail(path: str | None, fault: str) -> NoReturn:
    """Raise the reader's UserError: '<path>: <fault>'."""
    raise UserError(f"{path}: {fault}")


def read_text(path: str) -> str:
    """The whole text of a captions file: strict UTF-8, a leading BOM dropped.

    A byte that is not UTF-8 is a UserError naming its line (1-based) and byte offset in the file
    (0-based): silently replacing it would change captions and image names.
    """
    with open(path, "rb") as f:
        raw = f.read()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        fail(path, f"not UTF-8 text: line {line}, byte offset {offset} "
                   f"(0x{raw[offset]:02x}); re-encode the file as UTF-8 and run again")


def read_json(path: str) -> Any:
    """A JSON file read through read_text; invalid JSON is a UserError naming the file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        fail(path, f"not valid JSON ({e})")


def contained_name(folder: str, name: str) -> str | None:
    """`name` normalised, if it is a relative path that stays inside `folder`; else None.

    The test is lexical (os.path.normpath of the joined name, no symlink resolution): an absolute
    name or a `..` that climbs out is refused, while a symlink the user put inside the folder (say
    to a shared read-only copy) stays allowed. Callers open the normalised name, so what is opened
    is what was checked (`link/../x` cannot reach past a linked folder).
    """
    root = os.path.abspath(folder)
    joined = os.path.normpath(os.path.join(root, name))
    if joined == root or not joined.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(joined, root)


def summarise_outside(source: str, folder: str, outside: list[tuple[str, int | str]]) -> list[str]:
    """Report (image name, where) pairs whose name leaves `folder`: one warning, one skipped note each.
    `where` is a line number of `source` or a label such as 'image id 7'."""
    if not outside:
        return []
    warn_once(f"{source}: {len(outside)} image names leave the image folder {folder} "
              f"(e.g. '{outside[0][0]}'); skipped")
    base = os.path.basename(source)
    places = [f"{base}:{where}" if isinstance(where, int) else f"{base} ({where})" for _, where in outside]
    return [f"{place}: image '{name}' is outside the image folder {folder}"
            for place, (name, _) in zip(places, outside)]


def keep_inside(source: str, folder: str, entries: Iterable[tuple]) -> tuple[list[tuple], list[str]]:
    """Entries (image name, ..., where) whose name stays inside `folder`, renamed to the normalised
    name, plus the skipped notes of the others (see summarise_outside)."""
    kept, outside = [], []
    for name, *rest in entries:
        safe = contained_name(folder, name)
        if safe is None:
            outside.append((name, rest[-1]))
        else:
            kept.append((safe, *rest))
    return kept, summarise_outside(source, folder, outside)


def first_existing(paths: Iterable[str], kind: str = "file") -> str | None:
    """The first of `paths` that is a file (kind 'file') or a folder (kind 'dir'), or None."""
    check = os.path.isdir if kind == "dir" else os.path.isfile
    return next((p for p in paths if check(p)), None)


def list_images(image_dir: str) -> list[str]:
    """Image file names (sorted) directly inside image_dir."""
    if not os.path.isdir(image_dir):
        fail(image_dir, "image folder not found (get the dataset with --download, or pass --data_dir)")
    return sorted(name for name in os.listdir(image_dir)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))


def summarise_orphans(path: str, orphans: list[tuple[str, int]]) -> list[str]:
    """Report caption lines that name no image file: one warning, one skipped entry per line."""
    if not orphans:
        return []
    names = sorted({name for name, _ in orphans})
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    warn_once(f"{path}: {len(orphans)} caption lines name no image file ({shown}); skipped")
    source = os.path.basename(path)
    return [f"{source}:{line}: caption of '{name}' matches no image file" for name, line in orphans]


def read_caption_table(path: str, required: tuple[str, ...] = ("image", "caption")
                       ) -> tuple[list[tuple[dict[str, str], int]], list[str]]:
    """Rows of a CSV (header line) or JSONL file as (dict, line number), plus skipped-line notes.

    CSV goes through the csv module, so a caption holding a comma (quoted in the file) keeps its
    text without stray quote marks. JSONL is chosen by the extension (.jsonl/.json) or a first
    character '{'.
    """
    if not os.path.isfile(path):
        fail(path, "caption file not found")
    text = read_text(path)
    if path.lower().endswith((".jsonl", ".json")) or text.lstrip()[:1] == "{":
        rows, skipped = _jsonl_rows(text, os.path.basename(path), required)
    else:
        rows, skipped = _csv_rows(text, path, required)
    if skipped:
        warn_once(f"{path}: {len(skipped)} malformed lines skipped (first: {skipped[0]})")
    if not rows:
        fail(path, "no usable caption rows")
    rows, repeated = drop_repeated_rows(path, rows)
    return rows, skipped + repeated


def drop_repeated_rows(path: str, rows: list[tuple[dict[str, str], int]]
                       ) -> tuple[list[tuple[dict[str, str], int]], list[str]]:
    """The rows without repeats of an earlier (image, caption) pair, plus one skipped note per repeat and
    one warning with their count. A repeated pair would be two queries with one answer: it weighs that
    caption twice in every recall (in one file, t2i R@1 42.0 became 45.0)."""
    first: dict[tuple[str, str], int] = {}
    kept, notes = [], []
    base = os.path.basename(path)
    for row, number in rows:
        key = (os.path.normpath(row.get("image", "")), row.get("caption", ""))
        if key in first:
            notes.append(f"{base}:{number}: repeats line {first[key]} (same image and caption); dropped")
            continue
        first[key] = number
        kept.append((row, number))
    if notes:
        warn_once(f"{path}: {len(notes)} rows repeat an earlier (image, caption) row; dropped (first: {notes[0]})")
    return kept, notes


def _jsonl_rows(text: str, base: str, required: tuple[str, ...]
                ) -> tuple[list[tuple[dict[str, str], int]], list[str]]:
    rows, skipped = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(f"{base}:{number}: malformed JSON line ({e.msg})")
            continue
        if not isinstance(row, dict) or any(not str(row.get(k) or "").strip() for k in required):
            skipped.append(f"{base}:{number}: malformed line (needs non-empty {', '.join(required)})")
            continue
        rows.append(({k: str(v).strip() for k, v in row.items()}, number))
    return rows, skipped


def _csv_rows(text: str, path: str, required: tuple[str, ...]
              ) -> tuple[list[tuple[dict[str, str], int]], list[str]]:
    rows, skipped = [], []
    base = os.path.basename(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if any(k not in header for k in required):
        fail(path, f"CSV header must name the columns {', '.join(required)} (found {reader.fieldnames})")
    reader.fieldnames = header
    for row in reader:
        number = reader.line_num
        if None in row or any(not (row.get(k) or "").strip() for k in required):
            skipped.append(f"{base}:{number}: malformed line (expected {len(header)} fields with "
                           f"non-empty {', '.join(required)})")
            continue
        rows.append(({k: (v or "").strip() for k, v in row.items()}, number))
    return rows, skipped


def read_flickr8k_tokens(path: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """(image, caption, line number) triples of Flickr8k.token.txt, plus malformed-line notes."""
    triples, skipped = [], []
    base = os.path.basename(path)
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.strip().rpartition("#")
        if not tab or not hash_sign or not name or not index.isdigit() or not caption.strip():
            skipped.append(f"{base}:{number}: malformed line (expected '<image>#<n><TAB><caption>'): "
                           f"{line[:60]!r}")
            continue
        triples.append((name, caption.strip(), number))
    if skipped:
        warn_once(f"{path}: {len(skipped)} malformed lines skipped (first: {skipped[0]})")
    if not triples:
        fail(path, "no caption lines found")
    return triples, skipped
