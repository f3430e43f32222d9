"""--download against a loopback HTTP server (127.0.0.1, in a thread) serving archives the test builds."""
import hashlib
import http.server
import io
import os
import tarfile
import threading
import zipfile

import pytest

from conftest import as_script
from retrieval import download


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range 'bytes=N-' support (what fetch() sends to resume)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        self.server.requests.append((self.path, self.headers.get("Range")))
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()

    def handler(*args, **kwargs):
        return RangeHandler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def make_zip(path, files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    data = buffer.getvalue()
    path.write_bytes(data)
    return data


def test_download_extract_skip_and_resume(server, tmp_path):
    root, base_url, httpd = server
    # one archive with a single top folder, one with loose files (like Flickr8k_text.zip)
    images = make_zip(root / "imgs.zip", {"Flicker8k_Dataset/a.jpg": b"x" * 5000, "Flicker8k_Dataset/b.jpg": b"y" * 300,
                                          "__MACOSX/._a.jpg": b"junk"})
    text = make_zip(root / "text.zip", {"Flickr8k.token.txt": "a.jpg#0\ta cat .\n" * 50})
    archives = [download.Archive("imgs.zip", "unused", "Flicker8k_Dataset", len(images),
                                 hashlib.sha256(images).hexdigest()),
                download.Archive("text.zip", "unused", "Flickr8k_text")]
    data_dir = tmp_path / "flickr8k"

    # a truncated .part from an interrupted run is resumed with a Range request
    (data_dir / ".downloads").mkdir(parents=True)
    (data_dir / ".downloads" / "text.zip.part").write_bytes(text[:100])
    done = download.download_dataset("flickr8k", str(data_dir), base_url=base_url, archives=archives, progress=False)
    assert sorted(os.path.basename(p) for p in done) == ["Flicker8k_Dataset", "Flickr8k_text"]
    assert (data_dir / "Flicker8k_Dataset" / "a.jpg").read_bytes() == b"x" * 5000
    assert not (data_dir / "Flicker8k_Dataset" / "Flicker8k_Dataset").exists()
    assert not (data_dir / "__MACOSX").exists()
    assert (data_dir / "Flickr8k_text" / "Flickr8k.token.txt").read_text().count("\n") == 50
    assert ("/text.zip", "bytes=100-") in httpd.requests
    assert not (data_dir / ".downloads").exists()  # archives removed after extraction
    assert [e for e in os.listdir(data_dir) if e.startswith(".")] == []

    # second call: folders present -> no request at all
    before = len(httpd.requests)
    assert download.download_dataset("flickr8k", str(data_dir), base_url=base_url, archives=archives,
                                      progress=False) == []
    assert len(httpd.requests) == before


def test_corrupt_archive_clear_error_nothing_left(server, tmp_path):
    root, base_url, _ = server
    data = bytearray(make_zip(root / "bad.zip", {"val2017/1.jpg": b"z" * 20000}))
    data[200:400] = b"\0" * 200  # damage the member's bytes: its CRC no longer matches
    (root / "bad.zip").write_bytes(bytes(data))
    data_dir = tmp_path / "coco"
    archive = download.Archive("bad.zip", "unused", "val2017")
    with pytest.raises(SystemExit) as e:
        as_script(download.download_dataset, "coco", str(data_dir), base_url=base_url, archives=[archive],
                  progress=False)
    assert "corrupt archive" in str(e.value) and "bad.zip" in str(e.value)
    assert os.listdir(data_dir) == []  # no half-extracted folder, no temp folder, no archive

    # a wrong checksum is caught before extraction
    good = make_zip(root / "good.zip", {"x.txt": b"hello"})
    archive = download.Archive("good.zip", "unused", "x", len(good), "0" * 64)
    with pytest.raises(SystemExit) as e:
        as_script(download.download_dataset, "coco", str(data_dir), base_url=base_url, archives=[archive],
                  progress=False)
    assert "SHA-256" in str(e.value)
    assert not (data_dir / "x").exists()
    assert not any(name.endswith((".zip", ".part")) for _, _, files in os.walk(data_dir) for name in files)


def make_tar(path, members):
    """A .tar.gz of (name, content or ('symlink', target)) members."""
    with tarfile.open(path, "w:gz") as t:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                t.addfile(info)
            else:
                info.size = len(content)
                t.addfile(info, io.BytesIO(content))
    return path.read_bytes()


@pytest.mark.parametrize("kind, member", [
    ("zip", "../escaped.txt"),
    ("zip", "/escaped-absolute.txt"),   # an absolute member name
    ("tar", "../escaped.txt"),
    ("tar", "val2017/link"),  # a symlink out of the folder: a later member could be written through it
])
def test_unsafe_archive_is_named_so_and_not_extracted(server, tmp_path, kind, member):
    root, base_url, httpd = server
    name = f"unsafe.{'zip' if kind == 'zip' else 'tar.gz'}"
    inner = [("val2017/1.jpg", b"z" * 100)]
    if kind == "zip":
        make_zip(root / name, dict(inner + [(member, b"gotcha")]))
    elif member.endswith("link"):
        make_tar(root / name, inner + [(member, ("symlink", "../../outside"))])
    else:
        make_tar(root / name, inner + [(member, b"gotcha")])
    data_dir = tmp_path / "coco"
    archive = download.Archive(name, "unused", "val2017")
    with pytest.raises(SystemExit) as e:
        as_script(download.download_dataset, "coco", str(data_dir), base_url=base_url, archives=[archive],
                  progress=False)
    kept = data_dir / ".downloads" / name
    assert str(e.value) == (f"error: {kept}: unsafe archive (member '{member}' leaves the target folder); "
                            "not extracted")
    assert "corrupt" not in str(e.value) and "run again" not in str(e.value)
    assert os.listdir(data_dir) == [".downloads"] and os.listdir(kept.parent) == [name]  # kept, nothing extracted
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "outside").exists()

    # a second run does not download the same bytes again: it names the same fault at once
    before = len(httpd.requests)
    with pytest.raises(SystemExit, match="unsafe archive"):
        as_script(download.download_dataset, "coco", str(data_dir), base_url=base_url, archives=[archive],
                  progress=False)
    assert len(httpd.requests) == before


def test_network_failure_is_one_clear_line(tmp_path):
    # a closed loopback port: connection refused at once
    with pytest.raises(SystemExit) as e:
        as_script(download.fetch, "http://127.0.0.1:9/none.zip", str(tmp_path / "none.zip"), timeout=2, progress=False)
    message = str(e.value)
    assert message.startswith("error: cannot download http://127.0.0.1:9/none.zip")
    assert "--dataset synthetic" in message and "\n" not in message


def test_archive_choice_and_base_url(monkeypatch):
    names = [a.name for a in download.archives_for("coco", ["val"])]
    assert "train2017.zip" not in names and "val2017.zip" in names and "caption_datasets.zip" in names
    assert "train2017.zip" in [a.name for a in download.archives_for("coco", ["train", "val"])]
    archive = download.archives_for("flickr8k")[0]
    monkeypatch.setenv(download.BASE_URL_ENV, "http://mirror.example/data/")
    assert download.source_url(archive) == "http://mirror.example/data/Flickr8k_Dataset.zip"
    monkeypatch.delenv(download.BASE_URL_ENV)
    assert download.source_url(archive) == archive.url


def test_flickr30k_download_gives_a_folder_the_reader_loads(server, tmp_path, monkeypatch):
    """--dataset flickr30k --download: Karpathy's caption_datasets.zip -> karpathy/, the image zip ->
    flickr30k-images/ (from a loopback mirror), and the Karpathy test split loads from what was unpacked."""
    import json

    from PIL import Image

    import prepare_data
    from retrieval import data
    root, base_url, _ = server
    images = {}
    for i in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(buffer, "JPEG")
        images[f"flickr30k-images/{i}.jpg"] = buffer.getvalue()
    make_zip(root / "flickr30k-images.zip", images)
    entries = [{"filename": f"{i}.jpg", "imgid": i, "split": "test",
                "sentences": [{"raw": f"photo {i} caption {k}", "tokens": []} for k in range(5)]} for i in range(3)]
    make_zip(root / "caption_datasets.zip", {"dataset_flickr30k.json": json.dumps({"images": entries}),
                                             "dataset_coco.json": "{}"})
    monkeypatch.setenv(download.BASE_URL_ENV, base_url)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "f30k"
    prepare_data.main(["--dataset", "flickr30k", "--download", "--data_dir", str(data_dir), "--fetch_only", "data"])
    assert sorted(os.listdir(data_dir)) == ["flickr30k-images", "karpathy"]
    test = data.load_split("flickr30k", str(data_dir), "test")
    assert test.image_files == ["0.jpg", "1.jpg", "2.jpg"] and len(test.captions) == 15
    assert [a.target for a in download.archives_for("flickr30k")] == ["karpathy", "flickr30k-images"]
