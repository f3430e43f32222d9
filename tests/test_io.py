"""The hand-off file: round trip in both formats, and validation that names the file and fault."""
import errno
import fnmatch
import json
import os

import h5py
import numpy as np
import pytest

import run_experiments
from conftest import as_script, fill_up, mounted_tmpfs
from retrieval import handoff, io
from retrieval.errors import UserError


def make(random_split, **attrs):
    images, texts, text_to_image = random_split
    return handoff.Embeddings(images.copy(), texts.copy(), text_to_image.copy(), [f"img{i}.jpg" for i in range(40)],
                         [f"caption {i}" for i in range(200)], handoff.make_attrs("unit", "test", "none", 16, **attrs))


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_round_trip(tmp_path, random_split, suffix):
    emb = make(random_split, skipped=["bad.jpg: cannot identify image"], image_root="imgs")
    path = handoff.write_embeddings(tmp_path / f"e{suffix}", emb)
    back = handoff.read_embeddings(path)
    assert np.array_equal(back.image_embeddings, emb.image_embeddings)
    assert np.array_equal(back.text_embeddings, emb.text_embeddings)
    assert np.array_equal(back.text_to_image, emb.text_to_image)
    assert back.image_ids == emb.image_ids and back.captions == emb.captions
    assert back.attrs["skipped"] == ["bad.jpg: cannot identify image"]
    assert back.attrs["dataset"] == "unit" and back.attrs["dim"] == 16 and back.attrs["image_root"] == "imgs"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize("fault, message", [
    (lambda e: e.image_embeddings.__setitem__((3, 2), np.nan), "NaN"),
    (lambda e: setattr(e, "text_embeddings", e.text_embeddings * 2), "not L2-normalised"),
    (lambda e: e.text_to_image.__setitem__(0, 40), "outside"),
    (lambda e: setattr(e, "image_embeddings", e.image_embeddings.astype(np.float64)), "float32"),
    (lambda e: setattr(e, "text_to_image", e.text_to_image[:-1]), "text_to_image must have shape"),
    (lambda e: setattr(e, "text_to_image", np.where(e.text_to_image == 7, 8, e.text_to_image)), "no caption"),
])
def test_validation_names_file_and_fault(tmp_path, random_split, fault, message):
    emb = make(random_split)
    fault(emb)
    with pytest.raises(io.HandoffError, match=message) as err:
        handoff.write_embeddings(tmp_path / "bad.h5", emb)
    assert "bad.h5" in str(err.value)
    assert not (tmp_path / "bad.h5").exists()


def test_corrupt_file_and_missing_key(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(io.HandoffError, match="corrupt.h5: cannot read"):
        handoff.read_embeddings(bad)
    np.savez(tmp_path / "partial.npz", image_embeddings=np.eye(2, dtype=np.float32))
    with pytest.raises(io.HandoffError, match="missing dataset 'text_embeddings'"):
        handoff.read_embeddings(tmp_path / "partial.npz")


def test_legacy_npz_without_attrs_or_index(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 8)).astype(np.float16)  # not normalised, half precision
    texts = rng.normal(size=(50, 8)).astype(np.float16)
    np.savez(tmp_path / "coco_embeddings.npz", image_embeddings=images, text_embeddings=texts)
    emb = handoff.read_embeddings(tmp_path / "coco_embeddings.npz")
    assert emb.text_to_image.tolist() == np.repeat(np.arange(10), 5).tolist()
    assert emb.image_embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb.text_embeddings, axis=1), 1, atol=1e-5)
    assert any("consecutive" in note for note in emb.attrs["load_notes"])


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash mid-write")
    assert io.read_json(target) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # readable like a plain open(), not 0600


def tamper_npz(path, **changes):
    """Rewrite an .npz with some arrays replaced (None removes one)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {key: z[key] for key in z.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)


def replace_h5_dataset(key, value):
    def change(f):
        del f[key]
        f[key] = value
    return change


def set_h5_attr(key, value):
    def change(f):
        if value is None:
            del f.attrs[key]
        else:
            f.attrs[key] = value
    return change


MALFORMED = {
    "npz attrs 5": (".npz", dict(attrs=np.array("5")), "'attrs' must be a JSON object, got int 5"),
    "npz attrs list": (".npz", dict(attrs=np.array("[1, 2]")), "'attrs' must be a JSON object, got list"),
    "npz attrs string": (".npz", dict(attrs=np.array('"abc"')), "'attrs' must be a JSON object, got str"),
    "npz attrs not JSON": (".npz", dict(attrs=np.array("{oops")), "'attrs' is not valid JSON"),
    "npz attrs array": (".npz", dict(attrs=np.array(["{}", "{}"])), "'attrs' must be one JSON text, got a 1-D"),
    "npz attr wrong type": (".npz", dict(attrs=np.array('{"schema_version": 1, "skipped": 3}')),
                            "attribute 'skipped' must be a list, got 3"),
    "npz 0-d image_embeddings": (".npz", dict(image_embeddings=np.array(0.5, dtype=np.float32)),
                                 "'image_embeddings' must be a 2-D array of numbers, got a 0-D float32 array"),
    "npz 0-d captions": (".npz", dict(captions=np.array("one caption")), "'captions' must be a 1-D array of text"),
    "npz 0-d text_to_image": (".npz", dict(text_to_image=np.array(3)),
                              "'text_to_image' must be a 1-D array of integers, got a 0-D"),
    "legacy npz string embeddings": (".npz", dict(attrs=None, image_embeddings=np.full((40, 16), "abc")),
                                     "'image_embeddings' must be a 2-D array of numbers, got a 2-D <U3 array"),
    "legacy npz 0-d texts": (".npz", dict(attrs=None, text_to_image=None, text_embeddings=np.array(1.0)),
                             "'text_embeddings' must be a 2-D array of numbers, got a 0-D"),
    "legacy npz string index": (".npz", dict(attrs=None, text_to_image=None, caption_to_image=np.full(200, "x")),
                                "'caption_to_image' must be a 1-D array of integers"),
    "h5 attr number for list": (".h5", set_h5_attr("skipped", 5), "attribute 'skipped' must be a list, got 5"),
    "h5 attr array for text": (".h5", set_h5_attr("model", np.arange(3)), "attribute 'model' must be text"),
    "h5 attr text for integer": (".h5", set_h5_attr("dim", "sixteen"), "attribute 'dim' must be an integer"),
    "h5 1-D embeddings": (".h5", replace_h5_dataset("image_embeddings", np.ones(16, dtype=np.float32)),
                          "'image_embeddings' must be a 2-D array of numbers, got a 1-D float32 array"),
    "h5 0-d embeddings": (".h5", replace_h5_dataset("text_embeddings", np.float32(1)),
                          "'text_embeddings' must be a 2-D array of numbers, got a 0-D"),
    "h5 string embeddings": (".h5", replace_h5_dataset("image_embeddings", np.full((40, 16), b"abc")),
                             "'image_embeddings' must be a 2-D array of numbers"),
    "h5 float text_to_image": (".h5", replace_h5_dataset("text_to_image", np.zeros(200)),
                               "'text_to_image' must be a 1-D array of integers, got a 1-D float64 array"),
    "legacy h5 string embeddings": (".h5", lambda f: (set_h5_attr("schema_version", None)(f),
                                                      replace_h5_dataset("text_embeddings",
                                                                         np.full((200, 16), b"x"))(f)),
                                    "'text_embeddings' must be a 2-D array of numbers"),
}


def malformed_file(tmp_path, random_split, case):
    suffix, change, message = MALFORMED[case]
    path = handoff.write_embeddings(tmp_path / f"bad{suffix}", make(random_split))
    if suffix == ".npz":
        tamper_npz(path, **change)
    else:
        with h5py.File(path, "a") as f:
            change(f)
    return path, message


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_structure_is_one_error_naming_the_file(tmp_path, random_split, case):
    path, message = malformed_file(tmp_path, random_split, case)
    with pytest.raises(io.HandoffError) as err:
        handoff.read_embeddings(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_through_run_experiments(tmp_path, random_split, case):
    path, message = malformed_file(tmp_path, random_split, case)
    with pytest.raises(SystemExit) as err:
        run_experiments.main(["--data_path", path, "--output_dir", str(tmp_path / "result")])
    assert str(err.value).startswith(f"error: {path}: ") and message in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "result").exists()


def test_write_removes_stale_temps_of_that_output_only(tmp_path, random_split):
    target = tmp_path / "clip_test.h5"
    hour_ago = os.path.getmtime(tmp_path) - 2 * io.STALE_TEMP_AGE_S
    stale = tmp_path / ".clip_test.k3j_9x0a.tmp.h5"        # a killed --overwrite of this output
    fresh = tmp_path / ".clip_test.abcdefgh.tmp.h5"        # a live write of it by another job
    other = tmp_path / ".clip_dev.k3j_9x0a.tmp.h5"         # another output's temp
    longer = tmp_path / ".clip_test.x.k3j_9x0a.tmp.h5"     # the temp of clip_test.x.h5, not of clip_test.h5
    for temp in (stale, fresh, other, longer):
        temp.write_bytes(b"half-written")
    for temp in (stale, other, longer):
        os.utime(temp, (hour_ago, hour_ago))
    handoff.write_embeddings(target, make(random_split))
    assert not stale.exists()
    assert fresh.exists() and other.exists() and longer.exists()
    assert handoff.read_embeddings(target).dim == 16


def test_temp_glob_matches_atomic_path_names(tmp_path):
    for name in ("clip_test.h5", "a[1]*.npz", "run.json"):
        with io.atomic_path(tmp_path / name) as tmp:
            assert fnmatch.fnmatchcase(os.path.basename(tmp), io.temp_glob(name))


def test_require_writable(tmp_path):
    made_later = tmp_path / "new" / "deeper"
    assert io.require_writable(made_later, "--output_dir") == str(made_later)
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []  # checked, nothing left behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as err:
        io.require_writable(tmp_path / "file" / "out", "--export_dir")
    assert str(err.value) == (f"{tmp_path / 'file' / 'out'}: not writable ({tmp_path / 'file'} is not a folder); "
                              "choose another output folder with --export_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_require_writable_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for folder in (locked, locked / "sub"):
            with pytest.raises(UserError, match=r"not writable \(.*Permission denied\); choose another output "
                                                   r"folder with --model_dir"):
                io.require_writable(folder, "--model_dir")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("value, where, shown", [
    ({"groups": [{"value": 1.0}, {"value": float("nan")}]}, "groups[1].value", "nan"),
    ({"ratio": np.float32("inf")}, "ratio", "inf"),
    ({"ranks": np.array([1.0, -np.inf])}, "ranks[1]", "-inf"),
    (float("nan"), "the value", "nan"),
])
def test_write_json_refuses_nan_and_infinity_naming_where(tmp_path, value, where, shown):
    target = tmp_path / "summary.json"
    io.write_json(target, {"kept": True})
    with pytest.raises(ValueError) as err:
        io.write_json(target, value)
    assert str(err.value).startswith(f"{target}: {where} is {shown}, which strict JSON cannot hold")
    assert io.read_json(target) == {"kept": True}  # the old file is untouched, no temp file is left
    assert os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(ValueError, match="cannot hold"):
        io.write_json(tmp_path / "new.json", value)
    assert not (tmp_path / "new.json").exists()


def test_write_json_writes_numpy_values_as_strict_json(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": np.float32(1.5), "b": np.arange(3), "c": None, "d": np.int64(7)})
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert io.read_json(target) == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": 7}


def test_append_jsonl_is_strict_json(tmp_path):
    log = tmp_path / "log.jsonl"
    io.append_jsonl(log, {"epoch": 1, "loss": 0.5})
    with pytest.raises(ValueError):
        io.append_jsonl(log, {"epoch": 2, "loss": float("nan")})
    assert [json.loads(line) for line in open(log)] == [{"epoch": 1, "loss": 0.5}]


# ----------------------------------------------------------------------------- issue 28: disk full, sniffing, dim

class DiskFullAfter:
    """A file object that takes `room` bytes, then fails the way a full disk does (part written, ENOSPC)."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[:self._room])
            self._f.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk_writers(random_split):
    """(name of the output, write it) for every writer of retrieval/io.py."""
    emb = make(random_split)
    return {
        "summary.json": lambda path: io.write_json(path, {"rows": list(range(500))}),
        "run.ranks.npz": lambda path: io.write_ranks(path, {"t2i": np.arange(1.0, 201.0)}, emb.text_to_image),
        "emb_test.npz": lambda path: handoff.write_embeddings(path, emb),
        "log.jsonl": lambda path: io.append_jsonl(path, {"epoch": 2, "loss": 0.25, "pad": "x" * 200}),
    }


@pytest.mark.parametrize("name", ["summary.json", "run.ranks.npz", "emb_test.npz", "log.jsonl"])
def test_disk_full_in_a_writer_is_one_error_and_keeps_the_earlier_file(tmp_path, random_split, monkeypatch, name):
    target = tmp_path / name
    earlier = b'{"epoch": 1, "loss": 0.5}\n'
    target.write_bytes(earlier)
    real_open = open
    for writers in (io, handoff):   # the module-level open of every writer
        monkeypatch.setattr(writers, "open", lambda file, mode="r", *a, **k: DiskFullAfter(
            real_open(file, mode, *a, **k), 10) if set(mode) & set("wa") else real_open(file, mode, *a, **k),
            raising=False)
    with pytest.raises(SystemExit) as err:
        as_script(full_disk_writers(random_split)[name], str(target))
    assert str(err.value) == (f"error: {target}: cannot write (No space left on device); an earlier file there is "
                              "left unchanged")
    assert target.read_bytes() == earlier and os.listdir(tmp_path) == [name]   # no temp, no half line


def test_disk_full_on_a_real_full_file_system_keeps_the_earlier_file(tmp_path, random_split):
    with mounted_tmpfs(tmp_path / "small", "256k") as folder:
        target = os.path.join(folder, "emb_test.h5")
        handoff.write_embeddings(target, make(random_split, seed=1))
        earlier = open(target, "rb").read()
        fill_up(folder)
        with pytest.raises(io.UserError) as err:
            handoff.write_embeddings(target, make(random_split, seed=2))
        assert str(err.value) == (f"{target}: cannot write (No space left on device); an earlier file there is "
                                  "left unchanged")
        assert open(target, "rb").read() == earlier and sorted(os.listdir(folder)) == ["emb_test.h5", "filler"]


@pytest.mark.parametrize("suffix", [".h5", ".npz"])
def test_a_dim_attribute_contradicting_the_arrays_is_an_error(tmp_path, random_split, suffix):
    emb = make(random_split)
    emb.attrs["dim"] = 32   # the arrays are 16-d
    path = handoff.write_embeddings(tmp_path / f"emb_test{suffix}", emb)
    with pytest.raises(SystemExit) as err:
        run_experiments.main(["--data_path", path, "--output_dir", str(tmp_path / "result")])
    assert str(err.value) == f"error: {path}: attribute 'dim' is 32 but the embeddings are 16-d"
    assert not (tmp_path / "result").exists()


@pytest.mark.parametrize("written, renamed", [(".h5", ".npz"), (".npz", ".h5")])
def test_content_not_suffix_decides_how_a_file_is_read(tmp_path, random_split, written, renamed):
    path = handoff.write_embeddings(tmp_path / f"emb{written}", make(random_split))
    moved = str(tmp_path / f"emb{renamed}")
    os.rename(path, moved)
    emb = handoff.read_embeddings(moved)
    assert np.array_equal(emb.image_embeddings, random_split[0].astype(np.float32)) and emb.dim == 16


@pytest.mark.parametrize("content, found", [(b"\x80\x04K\x05.", r"it starts with b'\x80\x04K\x05.'"),
                                            (b"", "it is empty")])
def test_a_file_that_is_neither_hdf5_nor_npz_is_one_line(tmp_path, content, found):
    path = tmp_path / "emb_test.npz"
    path.write_bytes(content)   # a pickle: numpy would advise allow_pickle=True
    with pytest.raises(SystemExit) as err:
        run_experiments.main(["--data_path", str(path), "--output_dir", str(tmp_path / "result")])
    assert str(err.value) == f"error: {path}: cannot read (neither an HDF5 nor an .npz file: {found})"
    assert "pickle" not in str(err.value) and not (tmp_path / "result").exists()


def test_a_folder_given_as_the_data_file_is_one_line(tmp_path):
    folder = tmp_path / "emb_test.h5"
    folder.mkdir()
    with pytest.raises(SystemExit) as err:
        run_experiments.main(["--data_path", str(folder), "--output_dir", str(tmp_path / "result")])
    assert str(err.value) == f"error: {folder}: is a folder, not an embeddings file (.h5 or .npz)"
    assert not (tmp_path / "result").exists()
