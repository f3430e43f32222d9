"""Sweep embedding dim x precision x candidate size over FAISS indexes; measure quality, speed, memory.

Reads:  hand-off files (--data_path, --fit_path, --distractors FILE...), .h5 or .npz (retrieval/handoff.py).
Writes: <output_dir>/runs/<slug>-<hash8>.json, one per configuration (skipped ones included).

Example:
    python run_experiments.py --data_path ./coco_data/coco_embeddings.npz --output_dir ./result \
      --embedding_dims 256 512 1024 --precisions fp16 int8 int4 --candidate_sizes 32 100 1000 \
      --recall_k 1 5 10 --batch_size 128 --num_workers 4
"""
import concurrent.futures
import dataclasses
import os
import time

from tqdm import tqdm

from retrieval import inputs, metrics, precisions, reduction, runs, sweep, timing
from retrieval.env import pick_device, seed_everything
from retrieval.errors import HelpFormatter, Parser, cli
from retrieval.flags import non_negative_float, non_negative_int, positive_float, positive_int
from retrieval.grid import build_grid, run_name, shard_block
from retrieval.io import ranks_path, require_writable
from retrieval.sweep_settings import SweepSettings

# List flags whose repeated values would only compute (and overwrite) the same run files again; the paths
# among them compare as absolute paths ('./P.h5' is 'P.h5').
LIST_FLAGS = ("data_path", "fit_path", "embedding_dims", "dim_method", "precisions", "candidate_sizes", "recall_k",
              "directions", "index", "gallery_sizes", "pq_subdim", "nlist", "nprobe", "hnsw_m", "ef_search")
PATH_FLAGS = ("data_path", "fit_path")
# Timing / run flags and the least value each takes (a count of 0 would time or sample nothing).
def parse_args(argv=None):
    """(args, settings, (shard, shards)): the namespace as parsed (recorded in every run file as is),
    the sweep settings built from it, and the --shard block to run."""
    parser = Parser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", nargs="+", required=True,
                      help="hand-off file(s) to evaluate (.h5/.npz); several files with different native dims are each used for their own grid")
    data.add_argument("--fit_path", nargs="*", default=[],
                      help="hand-off file(s) (normally the train split) to train quantizers/PCA on; the one with the data file's native dim is used. Default: the evaluated file itself")
    data.add_argument("--output_dir", default="./result", help="results go to OUTPUT_DIR/runs/")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--embedding_dims", type=positive_int, nargs="*", default=[],
                      help="target dims; the native dim is always run; dims above native are skipped (never padded)")
    grid.add_argument("--dim_method", nargs="+", default=["pca"], choices=reduction.DIM_METHODS,
                      help="how to reduce below the native dim (PCA is fitted on the fit set); several: each "
                           "is its own configuration at every reduced dim (truncate suits Matryoshka models)")
    grid.add_argument("--precisions", nargs="+", default=list(precisions.DEFAULT_PRECISIONS),
                      choices=precisions.PRECISIONS,
                      help="stage-1 precisions (fp32 exact flat search always runs as the baseline; default all but "
                           "rq, whose training is slow at many codebooks: ask for it)")
    grid.add_argument("--candidate_sizes", type=positive_int, nargs="*", default=[32, 100, 1000],
                      help="stage-1 candidate counts C re-ranked with fp32; each precision also runs without re-ranking (C = max K)")
    grid.add_argument("--recall_k", type=positive_int, nargs="+", default=[1, 5, 10], help="K values for R@K and overlap@K")
    grid.add_argument("--directions", nargs="+", default=list(metrics.DIRECTIONS), choices=metrics.DIRECTIONS,
                      help="t2i: captions query images; i2t: images query captions")
    grid.add_argument("--index", nargs="+", default=["flat"], choices=precisions.INDEX_TYPES,
                      help="stage-1 index structure(s)")
    grid.add_argument("--gallery_sizes", type=positive_int, nargs="*", default=[],
                      help="pad the image gallery to these sizes with distractors (same number of extra captions for i2t); default: the real gallery")
    grid.add_argument("--distractors", nargs="+", default=["gaussian"],
                      help="'gaussian' (synthetic: fitted to the fit set per modality), or hand-off FILEs and "
                           "split:NAME (the evaluated file's _NAME sibling, e.g. split:train) whose rows are "
                           "used in the order given (images pad text->image, captions image->text)")
    grid.add_argument("--max_queries", type=non_negative_int, default=0, metavar="N",
                      help="at most N query images (and all their captions) per file, drawn with --seed; the gallery "
                           "keeps every item (0 = every image and caption is a query)")
    grid.add_argument("--max_code_bytes", type=non_negative_int, default=0, metavar="B",
                      help="leave out of the grid every code above B bytes a vector (the fp32 baseline stays; "
                           "0 = no cap): a budget sweep without the codes no budget takes")
    knobs = parser.add_argument_group("index settings")
    knobs.add_argument("--sq_ranges", default="per_dim", choices=("per_dim", "uniform"),
                       help="int8/int4 scalar quantizer ranges: one [min,max] per dimension, or one for all")
    knobs.add_argument("--pq_subdim", type=positive_int, nargs="+", default=[8],
                       help="pq/opq/rq: dims per codebook (M = dim / pq_subdim codebooks of 8 bits = M bytes a vector; "
                            "pq/opq split the dims into M blocks, rq's codebooks each span them all), one "
                            "configuration per value")
    # Several values of a knob: each is its own configuration (a recall-vs-speed curve per index). The
    # index is built once per build-time value (--nlist, --hnsw_m) and searched at every search-time value.
    knobs.add_argument("--nlist", type=non_negative_int, nargs="+", default=[0],
                       help="IVF lists, one index per value (0 = about 4*sqrt(gallery size))")
    knobs.add_argument("--nprobe", type=positive_int, nargs="+", default=[16], help="IVF lists visited per query")
    knobs.add_argument("--hnsw_m", type=positive_int, nargs="+", default=[32], help="HNSW links per node, one index per value")
    knobs.add_argument("--ef_search", type=positive_int, nargs="+", default=[64],
                       help="HNSW search beam (raised to k when smaller)")
    speed = parser.add_argument_group("timing")
    speed.add_argument("--batch_size", type=positive_int, default=128, help="queries per FAISS search call when timing throughput")
    speed.add_argument("--rounds", type=positive_int, default=10,
                       help="timed rounds per direction: each times every stage of the configuration and the "
                            "reference (fp32 exact at the native dim) once, in alternating order; speeds are the "
                            "median over rounds with a 95%% interval, speed-ups paired per round")
    speed.add_argument("--min_time", type=non_negative_float, default=0.3,
                       help="more rounds until a direction's rounds took this many seconds (and --rounds)")
    speed.add_argument("--max_time", type=positive_float, default=10.0,
                       help="stop a direction's rounds, and its single-query latency sample, once this many seconds "
                            "are spent (a large gallery: one pass cut into --rounds blocks)")
    speed.add_argument("--warmup", type=non_negative_int, default=1, help="untimed warm-up batches before each timed section")
    speed.add_argument("--latency_queries", type=positive_int, default=1000,
                       help="sampled single queries for latency percentiles, each timed next to the reference's; "
                            "p95 needs 200, p99 1000 (fewer: null, not estimable)")
    speed.add_argument("--latency_threads", type=non_negative_int, default=1,
                       help="FAISS threads for single-query latency (0 = same as --threads)")
    speed.add_argument("--threads", type=non_negative_int, default=0, help="FAISS OpenMP threads (0 = FAISS default: all cores)")
    run = parser.add_argument_group("run")
    run.add_argument("--num_workers", type=non_negative_int, default=4,
                     help="threads for loading files and untimed metric computation (never during timing)")
    run.add_argument("--shard", default="0/1", help="I/N: run block I (0-based) of N contiguous blocks of the grid")
    run.add_argument("--dry_run", action="store_true", help="list the grid (and what is done) and exit")
    run.add_argument("--overwrite", action="store_true", help="recompute configurations whose JSON exists")
    run.add_argument("--seed", type=int, default=0,
                     help="seeds PCA/random projection, distractors, the --max_queries sample, latency sample")
    run.add_argument("--device", default="", help="'' = auto (cuda -> mps -> cpu); FAISS GPU indexes need faiss-gpu, else CPU")
    args = parser.parse_args(argv)
    try:
        shard = tuple(int(v) for v in args.shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    note = collapse_repeats(args)
    if note:
        print(note)
    # The settings' fields are named after their flags.
    fields = dataclasses.fields(SweepSettings)
    settings = SweepSettings(**{f.name: getattr(args, f.name) for f in fields})
    return args, settings, shard


def collapse_repeats(args):
    """Drop the repeated values of the LIST_FLAGS from `args` (the first of each kept, in order); returns the one
    note line saying what was dropped, or None."""
    said = []
    for name in LIST_FLAGS:
        values = getattr(args, name)
        keys = [os.path.abspath(v) if name in PATH_FLAGS else v for v in values]
        kept = [v for i, v in enumerate(values) if keys[i] not in keys[:i]]
        if len(kept) < len(values):
            setattr(args, name, kept)
            said.append(f"--{name} {' '.join(map(str, values))} -> {' '.join(map(str, kept))}")
    return "note: repeated values collapsed, each configuration runs once: " + "; ".join(said) if said else None


def summary_line(name, config, record):
    if record.skipped is not None:
        return f"{name}: skipped ({record.skipped})"
    m, s, mem = record.metrics, record.speed, record.memory
    directions = config["directions"]
    qps = " ".join(f"{d} {s[f'{d}_qps']:.0f}" for d in directions)
    return (f"{name}: {metrics.format_metrics(m, config['k_values'], directions)} | qps {qps} | "
            f"{mem['bytes_per_vector']} B/vec x{mem['compression_ratio']:.1f}")


def dry_run(configs, todo, names, runs_dir, shard):
    """Print the shard's part of the grid and whether each run file exists; return their paths."""
    print(f"grid: {len(configs)} configurations, shard {shard[0]}/{shard[1]}: {len(todo)}")
    for i, (_, skip, _) in todo:
        done = os.path.exists(os.path.join(runs_dir, names[i] + ".json"))
        print(f"{i:5d} {'done' if done else 'todo'} {names[i]}" + (f"  [skip: {skip}]" if skip else ""))
    return [os.path.join(runs_dir, names[i] + ".json") for i, _ in todo]


def existing_runs(todo, names, runs_dir, loaded):
    """Grid positions of the shard's run files already written (skipped by this sweep), each checked, before
    anything is written, to have been computed from this sweep's inputs (sweep.check_same_inputs); a note
    counts those from before fingerprints, whose content cannot be checked."""
    done, unchecked = set(), 0
    for i, entry in todo:
        path = os.path.join(runs_dir, names[i] + ".json")
        record = sweep.existing_result(path)
        if record is not None:
            fit = loaded.fits[entry.file_index]
            sweep.check_same_inputs(path, record, fit, inputs.inputs_record(fit, entry.config))
            done.add(i)
            unchecked += not isinstance(record.get("inputs"), dict)
    if unchecked:
        print(f"note: {unchecked} run files under {runs_dir} predate content fingerprints: counted as done "
              "without checking the content of their input files (pass --overwrite to recompute them)")
    return done


@cli
def main(argv=None):
    args, settings, shard = parse_args(argv)
    seed_everything(settings.seed)
    device = pick_device(args.device)
    threads = timing.set_threads(settings.threads)
    runs_dir = os.path.join(args.output_dir, "runs")
    if not args.dry_run:  # before any file is read: a folder that cannot take results fails in seconds
        require_writable(args.output_dir, "--output_dir")
        require_writable(runs_dir, "--output_dir")
    with concurrent.futures.ThreadPoolExecutor(max(1, args.num_workers)) as pool:
        loaded = inputs.load_inputs(settings, args.data_path, args.fit_path, pool)
        configs = build_grid(settings, loaded.files, loaded.fits)
        todo = shard_block(list(enumerate(configs)), *shard)
        names = {i: run_name(entry.config, loaded.files[entry.file_index][1].attrs) for i, entry in todo}
        if args.dry_run:
            return dry_run(configs, todo, names, runs_dir, shard)
        done = set() if args.overwrite else existing_runs(todo, names, runs_dir, loaded)  # refuses before writing
        os.makedirs(runs_dir, exist_ok=True)
        sweep.remove_stale_temp_files(runs_dir)
        env = runs.environment_record(threads)
        written, groups = [], sweep.Groups(settings, loaded, pool, device)
        progress = tqdm(todo, desc="configs", unit="cfg")
        for i, entry in progress:
            path = os.path.join(runs_dir, names[i] + ".json")
            if i in done:
                continue
            config, emb = entry.config, loaded.files[entry.file_index][1]
            used = inputs.inputs_record(loaded.fits[entry.file_index], config)
            if entry.skip:
                record = runs.skipped_record(config, entry.skip, emb, used, env)
                runs.write_run(path, record)
            else:
                start = time.perf_counter()
                group = groups.of(entry)
                evaluated = sweep.evaluate_config(settings, group, config)
                record = runs.result_record(config, evaluated, emb, used, loaded.fits[entry.file_index].record(), env,
                                            vars(args), time.perf_counter() - start, os.path.basename(ranks_path(path)))
                # The rank file's caption -> image map is the queries' own (a --max_queries sample's images are
                # 0..n-1).
                runs.write_run(path, record, evaluated.ranks, group.query_sample.text_to_image)
            written.append(path)
            progress.write(summary_line(names[i], config, record))
        progress.close()
    print(f"{len(written)} written, {len(todo) - len(written)} already done, under {runs_dir}")
    return written


if __name__ == "__main__":
    main()
