"""The run record: what run_experiments.py writes for one configuration (RunRecord, the writer) and how
analyze_results.py reads a folder of them (the reader: loading, upgrading old files, checking their numbers,
one flat row per run, and the labels every table, plot and report line names a configuration by).

A run file is a JSON object: schema_version, config, metrics, speed, memory, env, data (the embeddings file's
attributes), inputs (path and sha256 of every file its numbers depend on: data, fit, distractors), fit, args,
ranks_file, created, elapsed_s; a skipped configuration's holds schema_version, config, skipped (the reason),
data, inputs and env. Files written before schema_version existed are version 0;
upgrade() turns any older file into the current shape, so the reader below knows one shape only.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from retrieval import timing
from retrieval.env import environment
from retrieval.errors import UserError
from retrieval.handoff import Embeddings
from retrieval.inputs import GAUSSIAN
from retrieval.io import ranks_path, write_json, write_ranks
from retrieval.metrics import DIRECTIONS
from retrieval.precisions import PRECISIONS

# 3: speed timed in rounds paired with fp32 exact at the native dim: per direction medians with 95% intervals
# (qps_ci_low / _ci_high, latency_p50_ms_ci_low, ...), speedup and latency_speedup with intervals, p95 / p99
# null when the sample cannot estimate them (latency_note), speed.conditions (load, CPU pressure, threads timed).
# Older files read with those columns null.
# 2: "inputs" (content fingerprints of the data, fit and distractor files; None in older files).
# 1: schema_version written; memory.total_bytes_per_vector in every measured run; config.distractors.source a
# list of files (or "gaussian") with "synthetic" beside it. 0: files without schema_version.
SCHEMA_VERSION = 3

# Read from the run's "config".
CONFIG_KEYS = ("dim", "native_dim", "dim_method", "precision", "candidate_size", "index", "gallery_size",
               "data_path")
# IVF / HNSW knobs read from the run's config.index_params (each value of a search knob is its own run).
KNOB_KEYS = ("nlist", "nprobe", "hnsw_m", "ef_search")
# Read from config.index_params too: a pq / opq / rq code's codebook count (run_experiments.py --pq_subdim).
CODEC_KEYS = ("pq_m",)
BUILD_KNOB = {"ivf": "nlist", "hnsw": "hnsw_m"}
SEARCH_KNOB = {"ivf": "nprobe", "hnsw": "ef_search"}
KNOB_NAMES = {"hnsw_m": "M"}  # how a label shows a knob (HNSW's M is what FAISS and papers call it)
# Written once per run under "memory".
MEMORY_KEYS = ("bytes_per_vector", "total_bytes_per_vector", "compression_ratio", "peak_rss_bytes")
# Written once per direction ("t2i_qps", "i2t_index_bytes", ...), and the section that holds them.
SPEED_ESTIMATES = ("qps", "speedup", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_speedup")
DIRECTIONAL_KEYS = {**{f"{name}{part}": "speed" for name in SPEED_ESTIMATES for part in ("", "_ci_low", "_ci_high")},
                    "reference_qps": "speed", "rounds": "speed", "latency_queries": "speed", "build_s": "speed",
                    "index_bytes": "memory"}
# The plain memory/speed columns in summary.csv order (the per-direction ones follow them).
COST_COLUMNS = ("bytes_per_vector", "total_bytes_per_vector", "index_bytes", "compression_ratio", "peak_rss_bytes") \
    + tuple(k for k in DIRECTIONAL_KEYS if k != "index_bytes")
# The machine while a run was timed (speed.conditions, timing.conditions), one column each.
CONDITION_KEYS = ("load_before", "load_after", "cpu_pressure_pct", "other_runnable_before", "cores", "threads_asked",
                  "threads_timed")
# The out-of-distribution numbers the sweep stores under metrics.ood of an fp32 exact run on a padded gallery
# (mean top-1 cosine to the image gallery of the text queries and of the real images; gap = image - text).
OOD_KEYS = ("text_top1_cosine", "image_top1_cosine", "gap")
# The sections of a run file whose numbers reach a table, a ranking or the summary JSON: a NaN or infinity in
# any of them makes the run invalid (json.load reads NaN / Infinity tokens; no measurement should give one).
CHECKED_SECTIONS = ("config", "metrics", "speed", "memory", "env", "data")


class AnalysisError(UserError):
    """The results folder cannot be analysed; str() names the folder or file and the fault."""


# ----------------------------------------------------------------------------- writing

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What evaluating one configuration measured: the run record's metrics, speed and memory sections, and
    per direction the 1-based rank of each query's first relevant item the metrics were computed from
    (inf = miss), which its rank file holds."""
    metrics: dict
    speed: dict
    memory: dict
    ranks: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run file's content: a measured configuration (skipped None) or a skipped one (then only config,
    skipped, data, inputs and env are written). inputs: inputs.inputs_record's."""
    config: dict
    data: dict
    env: dict
    inputs: dict | None = None
    skipped: str | None = None
    metrics: dict | None = None
    speed: dict | None = None
    memory: dict | None = None
    fit: dict | None = None
    args: dict | None = None
    ranks_file: str | None = None
    created: str | None = None
    elapsed_s: float | None = None

    def to_json(self) -> dict:
        """The JSON object of the run file, its sections in the order they have always been written."""
        if self.skipped is not None:
            body = {"config": self.config, "skipped": self.skipped, "data": self.data, "inputs": self.inputs,
                    "env": self.env}
        else:
            body = {"config": self.config, "metrics": self.metrics, "speed": self.speed, "memory": self.memory,
                    "env": self.env, "data": self.data, "inputs": self.inputs, "fit": self.fit, "args": self.args,
                    "ranks_file": self.ranks_file, "created": self.created, "elapsed_s": self.elapsed_s}
        return {"schema_version": SCHEMA_VERSION, **body}


def environment_record(threads: int) -> dict:
    """environment() plus the FAISS thread count in force and the cores this process may use."""
    env = environment(threads)
    env["faiss_threads"] = threads
    env["blas_threads_while_timing"] = timing.BLAS_THREADS
    env["blas"] = timing.blas_libraries()
    env["cpu_affinity"] = timing.cpu_threads_available()
    return env


def attrs_record(attrs: dict) -> dict:
    """The hand-off file's attributes as a run records them, a long list of skipped items shortened to a count."""
    out = dict(attrs)
    if isinstance(out.get("skipped"), list) and len(out["skipped"]) > 20:
        out["skipped"] = f"{len(out['skipped'])} items (see the hand-off file)"
    return out


def skipped_record(config: dict, reason: str, emb: Embeddings, inputs: dict, env: dict) -> RunRecord:
    return RunRecord(config, attrs_record(emb.attrs), env, inputs, skipped=reason)


def result_record(config: dict, evaluated: Evaluation, emb: Embeddings, inputs: dict, fit: dict, env: dict,
                  arguments: dict, elapsed_s: float, ranks_file: str) -> RunRecord:
    """The record of an evaluated configuration; inputs: inputs.inputs_record's; fit: the FitSet's record();
    ranks_file: the name of its rank file (written next to it by write_run)."""
    return RunRecord(config, attrs_record(emb.attrs), env, inputs, metrics=evaluated.metrics, speed=evaluated.speed,
                     memory=evaluated.memory, fit=fit, args=arguments, ranks_file=ranks_file,
                     created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     elapsed_s=elapsed_s)


def write_run(json_path: str, record: RunRecord, ranks: dict | None = None,
              text_to_image: np.ndarray | None = None) -> None:
    """Write a run: first its rank file (io.write_ranks), then the JSON, each atomically. The JSON is
    written last because its presence is what marks the run done."""
    if ranks is not None:
        write_ranks(ranks_path(json_path), ranks, text_to_image)
    write_json(json_path, record.to_json())


# ----------------------------------------------------------------------------- reading

def upgrade(record: dict) -> dict:
    """A run file's record (of any schema_version up to SCHEMA_VERSION) in the current shape; the one place
    that knows what older files lack. Version 0 -> 1: a measured run's memory.total_bytes_per_vector (the index
    bytes plus, re-ranked, the fp32 vectors at its dim that stage 2 reads) when it has none, and a distractor
    file named alone as config.distractors.source becomes a list of one, with "synthetic" said. 1 -> 2:
    "inputs" None (no fingerprints: unfingerprinted() counts such runs). 2 -> 3: nothing is added: speed
    intervals and conditions read as null (the report says which runs have none)."""
    out = dict(record)
    version = out.get("schema_version", 0)
    if version < 1:
        config = out["config"]
        if isinstance(config.get("distractors"), dict):
            out["config"] = dict(config, distractors=_distractors_v1(config["distractors"]))
        if isinstance(out.get("memory"), dict) and not out.get("skipped"):
            out["memory"] = _memory_v1(out["memory"], out["config"])
    if version < 2:
        out["inputs"] = None
    out["schema_version"] = SCHEMA_VERSION
    return out


def _distractors_v1(entry: dict) -> dict:
    source = entry.get("source")
    files = [source] if isinstance(source, str) and source != GAUSSIAN else source
    return dict(entry, source=files, synthetic=entry.get("synthetic", source == GAUSSIAN))


def _memory_v1(memory: dict, config: dict) -> dict:
    index_bytes = _number(memory.get("bytes_per_vector"))
    if _number(memory.get("total_bytes_per_vector")) is not None or index_bytes is None:
        return memory
    dim = config.get("dim")
    total = index_bytes + (4.0 * dim if config.get("rerank") and dim is not None else 0.0)
    # A non-finite number makes the run invalid (split_invalid) by the fields it has; none is added.
    return dict(memory, total_bytes_per_vector=total) if _finite(total) else memory


def data_attrs(run: dict) -> dict:
    """The embeddings file's attributes (dataset, split, model, ...) stored under the run's "data"."""
    data = run.get("data")
    return data if isinstance(data, dict) and ("dataset" in data or "model" in data) else {}


def data_fingerprint(run: dict) -> str | None:
    """The sha256 of the evaluated file's arrays recorded under the run's "inputs" (None before schema 2)."""
    inputs = run.get("inputs")
    data = inputs.get("data") if isinstance(inputs, dict) else None
    sha = data.get("sha256") if isinstance(data, dict) else None
    return sha if isinstance(sha, str) and sha else None


def run_id(run: dict) -> str:
    return os.path.splitext(os.path.basename(run["_file"]))[0]


def load_runs(results_dir: str) -> list[dict]:
    """All run JSONs under <results_dir>/runs/ (sorted by name), each upgraded to the current shape and its
    path (relative to results_dir) under "_file". Raises AnalysisError when there are none, or one is not a
    run file this code reads."""
    if not os.path.isdir(results_dir):
        raise AnalysisError(f"{results_dir}: folder not found")
    runs_dir = os.path.join(results_dir, "runs")
    paths = sorted(glob.glob(os.path.join(runs_dir, "*.json")))
    if not paths:
        raise AnalysisError(f"{results_dir}: no run files ({os.path.join(results_dir, 'runs', '*.json')}); "
                            "run run_experiments.py --output_dir on this folder first")
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                run = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
            raise AnalysisError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise AnalysisError(f"{path}: not a run file (no 'config' object)")
        version = run.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= SCHEMA_VERSION:
            raise AnalysisError(f"{path}: schema_version {version!r} is not one this code reads "
                                f"(0 to {SCHEMA_VERSION}); analyse it with the code that wrote it")
        run = upgrade(run)
        run["_file"] = os.path.relpath(path, results_dir)
        runs.append(run)
    return runs


def non_finite_fields(run: dict) -> list[tuple[str, str]]:
    """[("memory.bytes_per_vector", "Infinity"), ...]: where the numbers of the run's CHECKED_SECTIONS are NaN or
    infinite (or an integer too large for a float), and how the run file spells them."""
    return [found for section in CHECKED_SECTIONS for found in _non_finite(run.get(section), section)]


def _non_finite(value, where):
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _non_finite(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in _non_finite(item, f"{where}[{i}]")]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or _finite(value):
        return []
    if isinstance(value, int):
        return [(where, "an integer beyond the float range")]
    return [(where, "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))]


def _finite(number):
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer too large for a float (JSON allows any number of digits)
        return False


def split_invalid(runs: list[dict], results_dir: str) -> tuple[list[dict], list[dict]]:
    """(valid runs, invalid): a run with a non-finite number is left out of every table, ranking, frontier and
    operating point; invalid lists each as {"file", "run_id", "fields", "reason"}. Raises AnalysisError when
    no run is valid."""
    valid, invalid = [], []
    for run in runs:
        found = non_finite_fields(run)
        if not found:
            valid.append(run)
            continue
        reason = "; ".join(f"{where} is {shown}" for where, shown in found)
        invalid.append({"file": run["_file"], "run_id": run_id(run), "fields": [where for where, _ in found],
                        "reason": f"non-finite number ({reason})"})
    if not valid:
        raise AnalysisError(f"{results_dir}: all {len(runs)} run files are invalid, e.g. "
                            f"{os.path.join(results_dir, invalid[0]['file'])}: {invalid[0]['reason']}")
    return valid, invalid


# ----------------------------------------------------------------------------- labels

def candidate_label(row: Mapping[str, Any]) -> str:
    """'exact', 'no rerank' or 'C=<size>': how the final ranking was produced."""
    if row["exact"]:
        return "exact"
    if not row["rerank"]:
        return "no rerank"
    return f"C={int(row['candidate_size'])}"


def config_label(row: Mapping[str, Any]) -> str:
    """Short human name of a configuration, e.g. 'int8 256d C=100' or 'int8 256d C=100 [ivf nlist=128 nprobe=16]'
    (index and its knobs shown when not flat, so runs at different knob values get different names)."""
    return f"{family_label(row)} {row['candidate']}" + index_label(row)


def codec_label(row: Mapping[str, Any]) -> str:
    """The precision, a product or residual code with its codebooks as FAISS names them ('pq8x8', 'rq8x8': 8 of
    8 bits), since --pq_subdim can put several codes of one precision and dim in a sweep."""
    precision = str(row["precision"])
    pq_m = _number(row.get("pq_m"))
    return precision if pq_m is None or math.isnan(pq_m) else f"{precision}{int(pq_m)}x8"


def family_label(row: Mapping[str, Any]) -> str:
    """'int8 256d (pca)': codec and dim, the part of a label that neither candidates nor index change."""
    precision = codec_label(row)
    label = f"{precision} {int(row['dim'])}d" if row.get("dim") is not None else precision
    if row.get("dim_method") and row.get("native_dim") is not None and row.get("dim") is not None \
            and int(row["dim"]) < int(row["native_dim"]):
        label += f" ({row['dim_method']})"
    return label


def index_label(row: Mapping[str, Any], search_knob: bool = True) -> str:
    """' [ivf nlist=128 nprobe=16]' for a non-flat index ('' for flat); search_knob=False leaves nprobe /
    ef_search out (the name of a knob curve, which runs through them)."""
    index = row.get("index")
    if not index or str(index).lower() in ("flat", "none"):
        return ""
    knobs = [BUILD_KNOB.get(index)] + ([SEARCH_KNOB.get(index)] if search_knob else [])
    shown = [f"{KNOB_NAMES.get(k, k)}={int(row[k])}" for k in knobs if k and _number(row.get(k)) is not None]
    return f" [{' '.join([str(index)] + shown)}]"


def precision_rank(precision: str | None) -> tuple[int, str]:
    """Sort key: the known precisions in retrieval.precisions order (a product code named with its
    sub-quantizers, 'pq8x8', beside its precision), then any other name alphabetically."""
    code = re.fullmatch(r"([a-z]+)(\d+)x8", str(precision))
    if code and code.group(1) in PRECISIONS:
        return PRECISIONS.index(code.group(1)), f"{int(code.group(2)):06d}"
    return (PRECISIONS.index(precision), "") if precision in PRECISIONS else (len(PRECISIONS), str(precision))


def precision_order(values: Iterable[str]) -> list[str]:
    return sorted(dict.fromkeys(values), key=precision_rank)


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "unknown"


def run_row(run: dict) -> dict:
    """One flat row (a dict) for one run JSON: config, metrics, speed, memory, source."""
    attrs, config, memory = data_attrs(run), run["config"], run.get("memory") or {}
    row = {"run_id": run_id(run), "file": run["_file"]}
    for name in ("dataset", "split", "model"):
        row[name] = str(attrs.get(name, "unknown"))
    row["group"] = _slug(f"{row['dataset']}_{row['split']}_{row['model']}")
    row["title"] = f"{row['dataset']} / {row['split']} / {row['model']}"
    row["data_sha256"] = data_fingerprint(run)
    skipped = run.get("skipped")
    row["status"] = "skipped" if skipped else "ok"
    row["skipped_reason"] = str(skipped) if skipped else ""
    row.update({name: config.get(name) for name in CONFIG_KEYS})
    params = config.get("index_params") if isinstance(config.get("index_params"), dict) else {}
    row.update({name: _number(params.get(name)) for name in KNOB_KEYS + CODEC_KEYS})
    row["exact"], row["rerank"] = bool(config.get("exact")), bool(config.get("rerank"))
    row["candidate"] = candidate_label(row)
    row["label"] = config_label(row)
    row["distractors"], row["distractors_synthetic"] = distractor_source(config.get("distractors"))
    ood = (run.get("metrics") or {}).get("ood")
    row.update({f"ood_{key}": _number((ood if isinstance(ood, dict) else {}).get(key)) for key in OOD_KEYS})
    for name in COST_COLUMNS:  # per-direction values are filled in below; this fixes the column order
        row[name] = _number(memory.get(name)) if name in MEMORY_KEYS else None
    for name, section in DIRECTIONAL_KEYS.items():
        values = run.get(section) or {}
        for d in DIRECTIONS:
            row[f"{d}_{name}"] = _number(values.get(f"{d}_{name}"))
        # run_experiments.py times each direction separately; the plain column is the first direction
        # timed (text→image when both were), so runs of either direction have one column to compare.
        row[name] = next((row[f"{d}_{name}"] for d in DIRECTIONS if row[f"{d}_{name}"] is not None), None)
    conditions = (run.get("speed") or {}).get("conditions")
    row.update({key: _number((conditions if isinstance(conditions, dict) else {}).get(key)) for key in CONDITION_KEYS})
    for key, value in (run.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
            row[same_dim_name(key)] = value
    return row


def name_groups(rows: list[dict]) -> list[dict]:
    """The rows with their groups keyed by the evaluated file's content too: runs of files whose dataset / split /
    model attributes are equal but whose fingerprints differ are never compared with each other. Such a group's
    name and title get the fingerprint's first 8 digits and the file name; a group whose files are all one
    content (or carry no fingerprint, files before schema 2) keeps its plain name."""
    contents = {}
    for row in rows:
        contents.setdefault(row["group"], set()).add(row["data_sha256"])
    out = []
    for row in rows:
        if len(contents[row["group"]]) > 1:
            sha = (row["data_sha256"] or "")[:8]
            name = os.path.basename(str(row.get("data_path") or "")) or "unknown file"
            row = dict(row, group=f"{row['group']}_{sha or 'no-fingerprint'}",
                       title=f"{row['title']} ({name}, {f'sha256 {sha}' if sha else 'no fingerprint'})")
        out.append(row)
    return out


def unfingerprinted(runs: list[dict]) -> int:
    """How many runs carry no fingerprint of their data file (written before schema 2)."""
    return sum(data_fingerprint(run) is None for run in runs)


def distractor_source(entry: dict | None) -> tuple[str | None, bool | None]:
    """(source, synthetic) of a run's config.distractors: "gaussian" or its files joined with ' + ', and whether
    they are synthetic; (None, None) on the real gallery."""
    if not isinstance(entry, dict):
        return None, None
    source = entry.get("source")
    return (" + ".join(map(str, source)) if isinstance(source, list) else str(source)), bool(entry.get("synthetic"))


def same_dim_name(key: str) -> str:
    """The sweep's '<d>_retention_<m>' is measured against fp32 exact at the run's OWN dim; it is renamed
    '<d>_retention_same_dim_<m>', and '<d>_retention_<m>' holds retention against the group's fp32 exact
    baseline (add_baseline_ratios), the meaning a requirement such as t2i_retention_R@1>=99 expects."""
    match = re.fullmatch(r"(t2i|i2t)_retention_(.+)", key)
    return f"{match.group(1)}_retention_same_dim_{match.group(2)}" if match else key

