"""Summarise a sweep: tables, Pareto frontiers, memory budgets, plots and a written report.

Reads:  <results_dir>/runs/*.json (one per configuration, written by run_experiments.py)
Writes: --output_path (default <results_dir>/experiment_summary.json), summary.csv and REPORT.md next
        to it, PNG plots under --plots_dir (default <results_dir>/plots/<dataset>_<split>_<model>/)

A run file with a NaN or infinite number is invalid: left out of every table, ranking, frontier and operating
point, and named (file and field) in one warning line on stderr, in REPORT.md and in the summary's invalid_runs.

Examples:
    python analyze_results.py --results_dir ./result --output_path ./result/experiment_summary.json
    python analyze_results.py --require "t2i_retention_R@1>=99" --require "t2i_latency_p99_ms<=2" \
        --objective min:bytes_per_vector
    python analyze_results.py --results_dir ./result --select_on dev   # choose on dev, report on test

Verdicts (indistinguishable / below / above fp32) use joint intervals over the group (retrieval/family.py);
REPORT.md also splits every loss into its parts (retrieval/decomposition.py) and lists results to check.
"""
import os
import sys

from retrieval import analysis, bootstrap, operating_points, report, selection, summary_text
from retrieval.bootstrap import Settings
from retrieval.errors import Parser, cli
from retrieval.flags import positive_int
from retrieval.frame import metric_columns, runs_frame
from retrieval.io import atomic_path, require_output_file, require_writable, write_json
from retrieval.runs import AnalysisError, load_runs, split_invalid, unfingerprinted


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", default="./result",
                        help="folder given to run_experiments.py --output_dir (holds runs/*.json)")
    parser.add_argument("--output_path", default=None,
                        help="summary JSON to write (default <results_dir>/experiment_summary.json); "
                             "summary.csv and REPORT.md go next to it")
    parser.add_argument("--plots_dir", default=None, help="folder for the PNG plots (default <results_dir>/plots)")
    parser.add_argument("--metric", default="RSUM",
                        help="metric that picks the best configuration per memory budget (e.g. RSUM, t2i_R@1)")
    parser.add_argument("--recall_k", type=positive_int, default=None,
                        help="K of the R@K shown in the plots (default: the smallest K in the runs)")
    parser.add_argument("--no_plots", action="store_true", help="write the summary and report without plots")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples of the images for the intervals (0 = no intervals)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("--require", action="append", default=[], metavar="EXPR",
                        help="operating point requirement COLUMN>=VALUE or COLUMN<=VALUE over summary.csv columns "
                             "(repeatable), e.g. 't2i_retention_R@1>=99' or 't2i_R@1_delta_ci_low>=-1'")
    parser.add_argument("--select_on", default=None, metavar="SPLIT",
                        help="choose every answer (operating points, budgets, frontiers) on the group of this split "
                             "(e.g. dev) and report it with the values of the same dataset and model's other "
                             "split(s), with the optimism (selection minus evaluation); default: choose on the "
                             "split reported")
    parser.add_argument("--objective", default=None, metavar="min|max:COLUMN",
                        help="what the operating point optimises among the runs meeting every --require "
                             f"(default {operating_points.DEFAULT_OBJECTIVE})")
    return parser.parse_args(argv)


def check_args(args):
    """Flag faults as one error line, before any file is read; returns (requirements, objective)."""
    bootstrap.check_resamples(args.bootstrap, "--bootstrap")   # its memory bound is bootstrap's to know
    if not 0 < args.confidence < 1:
        raise AnalysisError(f"--confidence {args.confidence}: must be between 0 and 1, e.g. 0.95")
    requirements = [operating_points.parse_requirement(text) for text in args.require]
    objective = operating_points.parse_objective(args.objective) if args.objective else None
    return requirements, objective


def check_outputs(args):
    """(summary path, its folder, plots folder), once each can be written: a folder given as the summary
    file, a file given as a folder or a read-only folder is one error line before any run is read."""
    output_path = args.output_path or os.path.join(args.results_dir, "experiment_summary.json")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    plots_dir = args.plots_dir or os.path.join(args.results_dir, "plots")
    require_output_file(output_path, "--output_path")
    for name in ("summary.csv", "REPORT.md"):   # written next to the summary, so the same flag moves them
        require_output_file(os.path.join(out_dir, name), "--output_path")
    if not args.no_plots:
        require_writable(plots_dir, "--plots_dir")
    return output_path, out_dir, plots_dir


@cli
def main(argv=None):
    args = parse_args(argv)
    requirements, objective = check_args(args)
    output_path, out_dir, plots_dir = check_outputs(args)
    runs, invalid = split_invalid(load_runs(args.results_dir), args.results_dir)
    for bad in invalid:
        print(f"warning: {os.path.join(args.results_dir, bad['file'])}: {bad['reason']}; left out of the analysis",
              file=sys.stderr)
    frame = runs_frame(runs)
    known = metric_columns(frame)
    if known and args.metric not in known:
        raise AnalysisError(f"--metric {args.metric}: not a metric of these runs (have: {', '.join(known)})")
    settings = Settings(args.bootstrap, args.confidence, args.seed)
    frame, summary, paired = analysis.analyse(frame, runs, args.metric, args.results_dir, settings, invalid)
    operating_points.check_columns(frame, requirements, objective)
    operating_points.add_to_summary(summary, frame, requirements, objective)
    selection.confirm(summary, frame, args.select_on, paired, requirements, objective)
    summary["results_dir"] = args.results_dir
    summary["args"] = vars(args)

    plots = {}
    if not args.no_plots:
        from retrieval import plots as plotting  # here, so --no_plots never loads matplotlib
        for group in summary["groups"]:
            written = plotting.group_plots(group, frame[frame["group"] == group["group"]], plots_dir,
                                           args.recall_k)
            plots[group["group"]] = written
            group["plots"] = [os.path.relpath(path, out_dir).replace(os.sep, "/") for _, path in written]

    # The summary first: write_json refuses a NaN / infinity, and then no table or report is replaced either.
    write_json(output_path, summary)
    csv_path = os.path.join(out_dir, "summary.csv")
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
    report_path = os.path.join(out_dir, "REPORT.md")
    with atomic_path(report_path) as tmp:
        with open(tmp, "w") as f:
            f.write(report.report_markdown(summary, frame, plots, out_dir))

    if unfingerprinted(runs):
        print(f"note: {unfingerprinted(runs)} of {len(runs)} run files predate content fingerprints (written before "
              "run schema 2): grouped by dataset/split/model alone, as before")
    for group in summary["groups"]:
        print(f"{group['title']}: {group['runs_completed']} runs, "
              f"{group['runs_skipped']} skipped")
        for sentence in summary_text.summary_sentences(group, summary):
            print(f"  - {sentence}")
    print(f"wrote {output_path}, {csv_path}, {report_path}"
          + (f" and {sum(len(v) for v in plots.values())} plots under {plots_dir}" if plots else ""))
    return summary


if __name__ == "__main__":
    main()
