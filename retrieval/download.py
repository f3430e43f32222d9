"""Fetch and unpack the official dataset archives (only with prepare_data.py --download).

Each archive is downloaded to <data_dir>/.downloads/<name>.part with a tqdm bar; an interrupted
download resumes from the .part file with an HTTP Range request. The finished file is checked
(size against the known size or the server's Content-Length, SHA-256 where it is known), extracted
into a temporary folder next to the target and renamed into place, so a target folder either is
complete or does not exist. A target folder that already exists is skipped. The archive is deleted
after a successful extraction (the folder is what marks it done).

Known checksums: COCO 2017 sizes (all three) and SHA-256 (val2017, annotations) as published by
other projects that pinned them; for Flickr8k, Flickr30k's image mirror and the Karpathy split files no
checksum is published, so only the server's Content-Length is checked.

The source can be redirected with the environment variable RETRIEVAL_DOWNLOAD_BASE_URL (or the
`base_url` argument): every archive is then fetched as <base_url>/<archive name> — for a mirror,
or for the tests' loopback server.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from retrieval.errors import UserError

BASE_URL_ENV = "RETRIEVAL_DOWNLOAD_BASE_URL"
TIMEOUT_S = 20  # per connect/read: an offline machine fails in seconds, not minutes
CHUNK = 1 << 20
OFFLINE_HINT = ("download the archives yourself and unpack them into the data folder (layouts in docs/datasets.md), "
                "or work offline with --dataset synthetic or --dataset csv")


@dataclass(frozen=True)
class Archive:
    name: str            # file name of the archive
    url: str             # official location
    target: str          # folder it becomes inside data_dir
    size: int | None = None     # bytes, when known
    sha256: str | None = None   # when known


ARCHIVES = {
    "flickr8k": (
        Archive("Flickr8k_Dataset.zip",
                "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                "Flicker8k_Dataset"),
        Archive("Flickr8k_text.zip",
                "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                "Flickr8k_text"),
    ),
    # Flickr30k's images are given out through a request form (shannon.cs.illinois.edu/DenotationGraph), with no
    # stable public URL; the zip on the Hugging Face dataset nlphuji/flickr30k is the copy retrieval
    # projects fetch. Karpathy's file is the same caption_datasets.zip as COCO's.
    "flickr30k": (
        Archive("caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                "karpathy"),
        Archive("flickr30k-images.zip",
                "https://huggingface.co/datasets/nlphuji/flickr30k/resolve/main/flickr30k-images.zip",
                "flickr30k-images"),
    ),
    "coco": (
        Archive("annotations_trainval2017.zip",
                "http://images.cocodataset.org/annotations/annotations_trainval2017.zip", "annotations",
                252907541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
        Archive("caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                "karpathy"),
        Archive("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip", "val2017",
                815585330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
        Archive("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip", "train2017", 19336861798),
    ),
}


class DownloadError(UserError):
    """A download or an archive failed; str() names the URL or file and the fault."""


def archives_for(dataset: str, splits: Iterable[str] | None = None) -> list[Archive]:
    """The archives a dataset needs. COCO's 18 GB train2017 is skipped only when just `val` is asked for."""
    if dataset not in ARCHIVES:
        raise DownloadError(f"--download: nothing to download for --dataset {dataset}")
    chosen = list(ARCHIVES[dataset])
    if dataset == "coco" and splits and set(splits) <= {"val"}:
        chosen = [a for a in chosen if a.target != "train2017"]
    return chosen


def source_url(archive: Archive, base_url: str | None = None) -> str:
    """Where to fetch `archive`: <base_url>/<name> when a base URL is set (argument or environment), else
    its official URL."""
    base_url = base_url if base_url is not None else os.environ.get(BASE_URL_ENV, "")
    return f"{base_url.rstrip('/')}/{archive.name}" if base_url else archive.url


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in CHUNK-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: str, size: int | None = None, sha256: str | None = None, timeout: float = TIMEOUT_S,
          progress: bool = True) -> str:
    """Download url to dest via dest + '.part', resuming a partial file with HTTP Range; verify; return dest."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "retrieval-prepare/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part already holds the whole file
                response = None
            else:
                raise
        if response is not None:
            with response:
                if have and response.status != 206:  # server ignored Range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length and length.isdigit() else size
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=os.path.basename(dest), disable=not progress, file=sys.stderr) as bar:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        f.write(block)
                        bar.update(len(block))
                if total and os.path.getsize(part) != total:
                    raise DownloadError(f"{url}: transfer stopped at {os.path.getsize(part)} of {total} "
                                        f"bytes; run again to resume from {part}")
    except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {url} ({reason}); {OFFLINE_HINT}") from None
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; the file was removed, run again")
    if sha256:
        actual = sha256_of(part)
        if actual != sha256:
            os.remove(part)
            raise DownloadError(f"{url}: SHA-256 {actual} does not match the expected {sha256}; "
                                "the file was removed, run again")
    os.replace(part, dest)
    return dest


class UnsafeArchive(Exception):
    """A member would be written outside the target folder (zip-slip): the archive itself is the fault."""


# What Python's tar "data" filter refuses (links or paths out of the folder, device files); () before 3.11.4.
TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _tar_member_paths(t: tarfile.TarFile) -> Iterator[tuple[str, str]]:
    """(member, path it writes or points to): a link's target counts, as a link out then a file through it
    escapes too, even on a Python without tar extraction filters."""
    for member in t.getmembers():
        yield member.name, member.name
        if member.issym():
            yield member.name, os.path.join(os.path.dirname(member.name), member.linkname)
        elif member.islnk():
            yield member.name, member.linkname


def _safe_members(member_paths: Iterable[tuple[str, str]], root: str) -> None:
    root = os.path.realpath(root)
    for name, inside in member_paths:
        path = os.path.realpath(os.path.join(root, inside))
        if path != root and not path.startswith(root + os.sep):
            raise UnsafeArchive(name)


def extract(archive_path: str, data_dir: str, target: str) -> str:
    """Unpack into a temp folder inside data_dir, then rename it to data_dir/target.

    If the archive holds a single top folder, that folder becomes the target. A corrupt archive
    raises DownloadError, is deleted (the next run downloads it again) and leaves no folder behind.
    An unsafe one (a member path or tar link that leaves the target folder) raises DownloadError and
    extracts nothing; it is kept, since downloading it again would fetch the same bytes.
    """
    final = os.path.join(data_dir, target)
    tmp = tempfile.mkdtemp(prefix=f".extract-{target}.", dir=data_dir)
    try:
        try:
            if zipfile.is_zipfile(archive_path):
                with zipfile.ZipFile(archive_path) as z:
                    _safe_members(((name, name) for name in z.namelist()), tmp)
                    z.extractall(tmp)  # checks each member's CRC while writing
            elif tarfile.is_tarfile(archive_path):
                with tarfile.open(archive_path) as t:
                    _safe_members(_tar_member_paths(t), tmp)
                    try:
                        t.extractall(tmp, filter="data")
                    except TypeError:  # Python without extraction filters
                        t.extractall(tmp)
            else:
                raise ValueError("not a zip or tar archive")
        except UnsafeArchive as e:
            raise DownloadError(f"{archive_path}: unsafe archive (member '{e}' leaves the target folder); "
                                "not extracted") from None
        except TAR_FILTER_ERROR as e:  # e.g. a device file: the archive is unsafe, not damaged
            raise DownloadError(f"{archive_path}: unsafe archive ({e}); not extracted") from None
        except (zipfile.BadZipFile, tarfile.TarError, ValueError, EOFError, OSError, zipfile.LargeZipFile) as e:
            os.remove(archive_path)
            raise DownloadError(f"{archive_path}: corrupt archive ({e}); it was deleted and nothing "
                                f"was extracted; run again to download it anew") from None
        shutil.rmtree(os.path.join(tmp, "__MACOSX"), ignore_errors=True)
        entries = [e for e in os.listdir(tmp) if not e.startswith(".")]
        source = tmp
        if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0])):
            source = os.path.join(tmp, entries[0])
        os.replace(source, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def download_dataset(dataset: str, data_dir: str, splits: Iterable[str] | None = None, base_url: str | None = None,
                     progress: bool = True, archives: Iterable[Archive] | None = None) -> list[str]:
    """Fetch and unpack every archive `dataset` needs (or the given `archives`) into data_dir.

    Target folders that already exist are skipped. Returns the folders created.
    """
    os.makedirs(data_dir, exist_ok=True)
    done = []
    downloads = os.path.join(data_dir, ".downloads")
    try:
        for archive in archives if archives is not None else archives_for(dataset, splits):
            final = os.path.join(data_dir, archive.target)
            if os.path.isdir(final):
                print(f"download: {final} already present, skipped")
                continue
            url = source_url(archive, base_url)
            # Integrity data belongs to the official file; a mirror/base_url serves the same bytes.
            path = fetch(url, os.path.join(data_dir, ".downloads", archive.name), archive.size, archive.sha256,
                         progress=progress)
            extract(path, data_dir, archive.target)
            os.remove(path)
            print(f"download: {archive.name} -> {final}")
            done.append(final)
    finally:
        # an empty .downloads folder (nothing left to resume) is not worth keeping
        if os.path.isdir(downloads) and not os.listdir(downloads):
            os.rmdir(downloads)
    return done
