#!/usr/bin/env bash
# Run the whole pipeline (prepare -> train -> experiments -> analyze) locally or on a Slurm / PBS / SGE cluster.
#
# Reads:  the environment variables below (every knob has a default), requirements.txt, the scripts next to
#         this file; the dataset in DATA_DIR (default coco_data/<dataset>/; it may be a read-only copy).
# Writes: EXPORT_DIR/*.h5 (hand-off files; default coco_data/<dataset>/, never DATA_DIR unless you set it so),
#         checkpoints/<run>/ (train phase), result/runs/*.json,
#         result/experiment_summary.json + summary.csv + REPORT.md + plots/, result/logs/*.log|*.out,
#         result/backups/result-<timestamp>.tar.gz (a copy of result/ at the end).
#
# Example:
#     bash submit_job.sh                                       # local: synthetic data, offline, a few minutes on CPU
#     mkdir -p result/logs && sbatch submit_job.sh             # the same as one Slurm job (qsub for PBS / SGE)
#     ARRAY=8 bash submit_job.sh                               # sweep as an 8-task job array + dependent analysis
#     DATASET=flickr8k DOWNLOAD=1 MODEL=openai/clip-vit-base-patch32 bash submit_job.sh
#
# The scheduler directives below are defaults; command-line options of sbatch/qsub override them
# (e.g. `sbatch --gres=gpu:1 --time=12:00:00 submit_job.sh`). The log folder must exist before sbatch/qsub.
# --ignore-pbs: sbatch would otherwise also apply the #PBS lines (and ask for their resources on top).
#
#SBATCH --job-name=retrieval
#SBATCH --ignore-pbs
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --output=result/logs/%x-%j.out
##SBATCH --gres=gpu:1
#PBS -N retrieval
#PBS -l walltime=04:00:00
#PBS -l select=1:ncpus=4:mem=16gb
##PBS -l select=1:ncpus=4:mem=16gb:ngpus=1
#PBS -j oe
#PBS -o result/logs/
#PBS -V
#$ -N retrieval
#$ -l h_rt=04:00:00
#$ -pe smp 4
#$ -cwd
#$ -j y
#$ -o result/logs/
#$ -V
#$ -S /bin/bash

set -Eeuo pipefail

# ------------------------------------------------------------------------------------------------ where am I
# Which scheduler started this script (none = a plain `bash submit_job.sh`).
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    SCHEDULER_RUNNING=slurm; JOB_ID=$SLURM_JOB_ID; SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
    TASK_INDEX=${SLURM_ARRAY_TASK_ID:-}
elif [[ -n "${PBS_JOBID:-}" ]]; then
    SCHEDULER_RUNNING=pbs; JOB_ID=$PBS_JOBID; SUBMIT_DIR=${PBS_O_WORKDIR:-$PWD}
    TASK_INDEX=${PBS_ARRAY_INDEX:-}
elif [[ -n "${JOB_ID:-}" && ( -n "${SGE_TASK_ID:-}" || -n "${SGE_O_WORKDIR:-}" ) ]]; then
    SCHEDULER_RUNNING=sge; SUBMIT_DIR=${SGE_O_WORKDIR:-$PWD}
    # SGE numbers array tasks from 1 (qsub -t 1-N) and says "undefined" outside an array
    TASK_INDEX=""; [[ "${SGE_TASK_ID:-undefined}" =~ ^[0-9]+$ ]] && TASK_INDEX=$((SGE_TASK_ID - 1))
else
    SCHEDULER_RUNNING=none; JOB_ID=""; TASK_INDEX=""
    SUBMIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fi
# Under a scheduler the script runs from a spool copy, so the code is found through the submit folder.
REPO_DIR=${REPO_DIR:-$SUBMIT_DIR}
cd "$REPO_DIR" || { echo "submit_job: error: REPO_DIR=$REPO_DIR: cannot cd" >&2; exit 2; }
if [[ ! -f prepare_data.py || ! -d retrieval ]]; then
    echo "submit_job: error: $REPO_DIR: not the project folder (no prepare_data.py); submit from the" \
         "repository folder or set REPO_DIR" >&2
    exit 2
fi

# ------------------------------------------------------------------------------------------------ knobs
# Every knob is an environment variable; docs/cluster.md lists them.
DATASET=${DATASET:-synthetic}              # synthetic | flickr8k | flickr30k | coco | csv
DATA_ROOT=${DATA_ROOT:-coco_data}
DATA_DIR=${DATA_DIR:-$DATA_ROOT/$DATASET}       # where the dataset is read (and downloaded to with DOWNLOAD=1)
# Hand-off files get their own folder, so a shared read-only dataset copy works as DATA_DIR.
EXPORT_DIR=${EXPORT_DIR:-coco_data/$DATASET}
DOWNLOAD=${DOWNLOAD:-0}                    # 1 = fetch the official archives (prefetch / prepare phase)
SPLITS=${SPLITS:-}                         # splits to embed; empty = prepare_data.py's default for the dataset
EVAL_SPLIT=${EVAL_SPLIT:-test}             # split the sweep evaluates
FIT_SPLIT=${FIT_SPLIT-train}               # split the quantizers / PCA are fitted on ('' = the evaluated file)
SELECT_SPLIT=${SELECT_SPLIT-dev}           # split the answers are chosen on (swept too, analysed with --select_on);
                                           # '' = choose on EVAL_SPLIT itself
SYNTHETIC_IMAGES=${SYNTHETIC_IMAGES:-}    # empty = prepare_data.py's default (2,500 images, 1,000 in test)
MODEL=${MODEL:-}                           # CLIP id or folder; empty = train a dual encoder from offline towers
DEVICE=${DEVICE:-}
NUM_WORKERS=${NUM_WORKERS:-2}
SEED=${SEED:-0}
# Training: the recipe (retrieval/recipes.py) holds the defaults; a knob set here overrides its part of it.
RECIPE=${RECIPE:-demo}                     # train_dual_encoder.py --recipe (demo | bench)
IMAGE_ENCODER=${IMAGE_ENCODER:-}
IMAGE_WEIGHTS=${IMAGE_WEIGHTS:-}
TEXT_ENCODER=${TEXT_ENCODER:-}
FREEZE_TOWERS=${FREEZE_TOWERS:-}           # 1 = frozen towers (features cached, epochs train the heads), 0 = trained
EMBEDDING_DIM=${EMBEDDING_DIM:-}
EPOCHS=${EPOCHS:-}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-}
CAPTIONS_PER_IMAGE=${CAPTIONS_PER_IMAGE:-}
LR=${LR:-}
MODEL_DIR=${MODEL_DIR:-checkpoints}
RUN_NAME=${RUN_NAME:-}                     # empty = the trainer's default, <dataset>-<image encoder>-<text encoder>
RESULT_DIR=${RESULT_DIR:-result}
EMBEDDING_DIMS=${EMBEDDING_DIMS:-64 128}
PRECISIONS=${PRECISIONS:-fp16 int8 int4 binary pq}
CANDIDATE_SIZES=${CANDIDATE_SIZES:-32 100}
RECALL_K=${RECALL_K:-1 5 10}
INDEX=${INDEX:-flat}
THREADS=${THREADS:-0}
DATA_PATH=${DATA_PATH:-}                   # hand-off files to sweep (one per line, or separated by spaces);
                                           # empty = the ones the phases above write
FIT_PATH=${FIT_PATH:-}
PREPARE_ARGS=${PREPARE_ARGS:-}             # extra arguments, passed on word by word
TRAIN_ARGS=${TRAIN_ARGS:-}
EXPERIMENT_ARGS=${EXPERIMENT_ARGS:-}
ANALYZE_ARGS=${ANALYZE_ARGS:-}
LOG_DIR=${LOG_DIR:-$RESULT_DIR/logs}
BACKUP=${BACKUP:-1}
BACKUP_DIR=${BACKUP_DIR:-$RESULT_DIR/backups}
CONDA_ENV=${CONDA_ENV:-}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-}
MODULES=${MODULES:-}                       # `module load` these first (clusters with environment modules)
CACHE_DIR=${CACHE_DIR:-}                   # HF_HOME / TORCH_HOME go under it (shared by login and compute nodes)
ARRAY=${ARRAY:-0}                          # N > 0: submit the sweep as an N-task job array (see docs/cluster.md)
SCHEDULER=${SCHEDULER:-}                   # array submission: slurm | pbs | sge (default: detected)
SUBMIT_ARGS=${SUBMIT_ARGS:-}               # extra sbatch/qsub options for every submitted job
GPUS=${GPUS:-0}                            # array submission: GPUs for the prepare/train job
WAIT=${WAIT:-0}                            # array submission: wait for the analysis job and report its result
JOB_NAME=${JOB_NAME:-retrieval}
SUBMIT_JOB_ROLE=${SUBMIT_JOB_ROLE:-}       # set by the array submission: setup | sweep | analyze
# Compute nodes often have no internet: jobs use only what the prefetch phase cached.
if [[ -z "${OFFLINE:-}" ]]; then OFFLINE=0; [[ $SCHEDULER_RUNNING != none ]] && OFFLINE=1; fi
if [[ -z "${PHASES:-}" ]]; then
    if [[ -n "$MODEL" ]]; then PHASES="prepare experiments analyze"; else PHASES="prepare train experiments analyze"; fi
fi
# the whole pipeline's phases (an array submission runs each job with a part of them)
PIPELINE_PHASES=${PIPELINE_PHASES:-$PHASES}

TIMESTAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOG_DIR" || { echo "submit_job: error: LOG_DIR=$LOG_DIR: cannot create the log folder" >&2; exit 2; }
if [[ $SCHEDULER_RUNNING == none ]]; then
    # the scheduler writes the job log itself; a local run keeps a copy of its output too
    LOCAL_LOG="$LOG_DIR/local-$TIMESTAMP-$$.log"
    exec > >(tee -a "$LOCAL_LOG") 2> >(tee -a "$LOCAL_LOG" >&2)
fi

say() { echo "submit_job: $*"; }
die() { echo "submit_job: error: $*" >&2; exit 2; }
has_phase() { [[ " $PHASES " == *" $1 "* ]]; }

CURRENT_PHASE="setup"
on_exit() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        echo "submit_job: FAILED in phase '$CURRENT_PHASE' (exit $status)${JOB_ID:+ [job $JOB_ID]};" \
             "the output above says why. Fix it and run again: finished work is skipped." >&2
        # SGE releases -hold_jid dependants whatever the exit status, except 100 (job error state)
        if [[ $SCHEDULER_RUNNING == sge && -n "$SUBMIT_JOB_ROLE" ]]; then exit 100; fi
    fi
}
trap on_exit EXIT

# A misspelt knob (EMBEDING_DIMS=32, PRECISION=int8) would otherwise be ignored and the default grid run without
# a word. Every variable this script reads is a known name (read off this file itself, so the list cannot
# drift); an exported variable that is not one of them but is one or two letters away from a knob, a knob cut
# short, or a knob with a suffix is an error. Names that systems, schedulers and libraries set are left alone.
check_knob_names() {
    local known suspects
    known=$(grep -oE '\$\{[A-Z_][A-Z0-9_]*[:}-]|^[A-Z_][A-Z0-9_]*=' "${BASH_SOURCE[0]}" | tr -d '${}:=-' | sort -u)
    suspects=$(compgen -e | grep -vE '^(SLURM|PBS|SGE|OMP|MKL|OPENBLAS|KMP|CUDA|NVIDIA|NCCL|HF|TORCH|TRANSFORMERS|CONDA|LMOD|LC|XDG|SSH|BASH|GIT|PIP|PYENV|PYTEST)_|^PYTHON[A-Z]|^MODULE|^_' || true)
    [[ -n "$suspects" ]] || return 0
    awk -v known="$known" '
        function lev(a, b,   i, j, la, lb, d, cost, x) {
            la = length(a); lb = length(b)
            for (i = 0; i <= la; i++) d[i, 0] = i
            for (j = 0; j <= lb; j++) d[0, j] = j
            for (i = 1; i <= la; i++) for (j = 1; j <= lb; j++) {
                cost = substr(a, i, 1) != substr(b, j, 1)
                x = d[i-1, j] + 1; if (d[i, j-1] + 1 < x) x = d[i, j-1] + 1
                if (d[i-1, j-1] + cost < x) x = d[i-1, j-1] + cost
                d[i, j] = x
            }
            return d[la, lb]
        }
        BEGIN { n = split(known, names, "\n"); for (i = 1; i <= n; i++) is_known[names[i]] = 1 }
        !($0 in is_known) {
            best = ""; best_d = 99
            for (i = 1; i <= n; i++) {
                k = names[i]
                if (length(k) < 4) continue
                d = lev($0, k)
                if ((d <= (length(k) < 8 ? 1 : 2) || (length($0) >= 5 && index(k, $0) == 1) ||
                     index($0, k "_") == 1) && d < best_d) { best = k; best_d = d }
            }
            if (best != "") {
                printf "%s is set but is not a knob (did you mean %s?); unset it or correct its name\n", $0, best
                exit 1
            }
        }' <<< "$suspects"
}
knob_fault=$(check_knob_names) || die "$knob_fault"

for phase in $PHASES; do
    case $phase in prefetch|prepare|train|experiments|analyze) ;;
        *) die "PHASES: unknown phase '$phase' (choose from prefetch prepare train experiments analyze)";; esac
done
[[ "$ARRAY" =~ ^[0-9]+$ ]] || die "ARRAY=$ARRAY: expected a number of array tasks"

# ------------------------------------------------------------------------------------------------ paths
# A list of files from one knob (DATA_PATH, FIT_PATH) into PATHS: one path per line, or words separated by
# spaces; a value that is itself an existing file is one path, so a single path with a space works either way.
split_paths() {
    local value=$1 line
    PATHS=()
    if [[ $value == *$'\n'* ]]; then
        while IFS= read -r line; do [[ -n $line ]] && PATHS+=("$line"); done <<< "$value"
    elif [[ -e $value ]]; then
        PATHS=("$value")
    else
        read -r -a PATHS <<< "$value"
    fi
}

# KNOB FOLDER: the folder (created if missing) must take a new file; checked before any model runs, so a
# read-only folder fails here and not after hours of training.
require_writable() {
    local knob=$1 folder=$2 probe
    if mkdir -p "$folder" 2>/dev/null && probe=$(mktemp "$folder/.write-test.XXXXXX" 2>/dev/null); then
        rm -f "$probe"
    else
        die "$knob=$folder: not writable; set $knob to a folder you can write"
    fi
}

# ------------------------------------------------------------------------------------------------ environment
if [[ -n "$CACHE_DIR" ]]; then
    export HF_HOME="$CACHE_DIR/huggingface" TORCH_HOME="$CACHE_DIR/torch"
fi

requirements_missing() {
    # distributions named in requirements.txt that are not installed (versions are not enforced)
    "$PY" - <<'EOF'
import re
from importlib import metadata
missing = []
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if not line or line.startswith("-"):
        continue
    name = re.split(r"[<>=!~;\[ ]", line)[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
EOF
}

setup_environment() {
    if [[ -n "$MODULES" ]]; then
        command -v module >/dev/null 2>&1 || die "MODULES=$MODULES: the 'module' command is not available"
        # shellcheck disable=SC2086
        module load $MODULES
    fi
    local managed=1
    if [[ -n "$PYTHON" ]]; then
        managed=0
    elif [[ -n "$CONDA_ENV" ]]; then
        command -v conda >/dev/null 2>&1 || die "CONDA_ENV=$CONDA_ENV: conda is not on PATH (MODULES=... to load it?)"
        eval "$(conda shell.bash hook)"
        conda activate "$CONDA_ENV" || die "CONDA_ENV=$CONDA_ENV: conda activate failed"
        managed=0
    elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
        managed=0
    elif [[ -f "$VENV/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
        managed=0
    fi
    PY=${PYTHON:-python3}
    command -v "$PY" >/dev/null 2>&1 || die "python interpreter '$PY' not found"
    local missing
    missing=$(requirements_missing)
    if [[ -n "$missing" ]]; then
        if [[ $managed == 1 ]]; then
            say "requirements missing ($missing): creating the virtual environment $VENV"
            "$PY" -m venv "$VENV" || die "cannot create $VENV (install python3-venv, or set CONDA_ENV / PYTHON)"
            # shellcheck disable=SC1091
            source "$VENV/bin/activate"
            PY=python3
        fi
        say "installing requirements.txt into $("$PY" -c 'import sys; print(sys.prefix)') (missing: $missing)"
        if command -v flock >/dev/null 2>&1; then
            # concurrent jobs sharing one environment install one at a time
            flock "$LOG_DIR/.requirements.lock" "$PY" -m pip install -r requirements.txt
        else
            "$PY" -m pip install -r requirements.txt
        fi
    fi
}

# ------------------------------------------------------------------------------------------------ file names
# File names and recipes are Python's: the scripts say what they would write (--list_exports, model_tag).
model_tag() {
    "$PY" -c 'import sys; from retrieval.models import model_tag; print(model_tag(sys.argv[1]))' "$1"
}

# train_dual_encoder.py's arguments for this configuration, exporting the given splits, in TRAIN_FLAGS.
train_flags() {
    TRAIN_FLAGS=(--recipe "$RECIPE" --dataset "$DATASET" --data_dir "$DATA_DIR" --model_dir "$MODEL_DIR"
                 --export_dir "$EXPORT_DIR" --export_splits "$@" --num_workers "$NUM_WORKERS" --device "$DEVICE"
                 --seed "$SEED")
    [[ -n "$RUN_NAME" ]] && TRAIN_FLAGS+=(--run_name "$RUN_NAME")
    [[ -n "$IMAGE_ENCODER" ]] && TRAIN_FLAGS+=(--image_encoder "$IMAGE_ENCODER")
    [[ -n "$IMAGE_WEIGHTS" ]] && TRAIN_FLAGS+=(--image_weights "$IMAGE_WEIGHTS")
    [[ -n "$TEXT_ENCODER" ]] && TRAIN_FLAGS+=(--text_encoder "$TEXT_ENCODER")
    [[ "$FREEZE_TOWERS" == 1 ]] && TRAIN_FLAGS+=(--freeze_image --freeze_text)
    [[ "$FREEZE_TOWERS" == 0 ]] && TRAIN_FLAGS+=(--no-freeze_image --no-freeze_text)
    [[ -n "$EMBEDDING_DIM" ]] && TRAIN_FLAGS+=(--embedding_dim "$EMBEDDING_DIM")
    [[ -n "$EPOCHS" ]] && TRAIN_FLAGS+=(--epochs "$EPOCHS")
    [[ -n "$TRAIN_BATCH_SIZE" ]] && TRAIN_FLAGS+=(--batch_size "$TRAIN_BATCH_SIZE")
    [[ -n "$CAPTIONS_PER_IMAGE" ]] && TRAIN_FLAGS+=(--captions_per_image "$CAPTIONS_PER_IMAGE")
    [[ -n "$LR" ]] && TRAIN_FLAGS+=(--lr "$LR" --head_lr "$LR")
    # shellcheck disable=SC2206
    TRAIN_FLAGS+=($TRAIN_ARGS)
}

# The hand-off files of the given splits that this configuration produces, in HANDOFF (an array: paths may
# hold spaces): the CLIP model's (MODEL set) and/or the trained dual encoder's (MODEL empty, or the train phase
# too). Leaves TRAIN_FLAGS set for those splits.
handoff_files() {
    local split
    HANDOFF=()
    if [[ -n "$MODEL" ]]; then
        for split in "$@"; do HANDOFF+=("$EXPORT_DIR/$(model_tag "$MODEL")_$split.h5"); done
    fi
    if [[ -z "$MODEL" || " $PIPELINE_PHASES " == *" train "* ]]; then
        trained_exports "$@"
        HANDOFF+=(${EXPORTS[@]+"${EXPORTS[@]}"})
    fi
    return 0
}

# The files train_dual_encoder.py exports for the given splits, in EXPORTS; leaves TRAIN_FLAGS set for them.
trained_exports() {
    local listed line
    EXPORTS=()
    train_flags "$@"
    listed=$("$PY" train_dual_encoder.py "${TRAIN_FLAGS[@]}" --list_exports)   # one path per line
    while IFS= read -r line; do [[ -n $line ]] && EXPORTS+=("$line"); done <<< "$listed"
    return 0
}

# ------------------------------------------------------------------------------------------------ phases
fetch_data() {
    # the dataset alone (no model): generated (synthetic) or downloaded (DOWNLOAD=1); csv data is the user's own
    [[ "$DATASET" == csv ]] && return
    local args=(--dataset "$DATASET" --data_dir "$DATA_DIR" --seed "$SEED" --fetch_only "${1:-data}")
    [[ -n "$SYNTHETIC_IMAGES" ]] && args+=(--synthetic_images "$SYNTHETIC_IMAGES")
    [[ -n "$SPLITS" ]] && args+=(--splits $SPLITS)
    [[ "$DOWNLOAD" == 1 ]] && args+=(--download)
    [[ -n "$MODEL" && "${1:-data}" == model ]] && args+=(--model "$MODEL")
    "$PY" prepare_data.py "${args[@]}"
}

phase_prefetch() {
    # Login node (with internet): everything the compute phases need goes into the caches / data folder,
    # loaded through the same code the phases use, so exactly the files they will ask for are fetched.
    unset HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_DATASETS_OFFLINE
    fetch_data "$([[ -n "$MODEL" ]] && echo model || echo data)"
    if [[ -z "$MODEL" || " $PIPELINE_PHASES " == *" train "* ]]; then
        train_flags "$EVAL_SPLIT"
        "$PY" train_dual_encoder.py "${TRAIN_FLAGS[@]}" --fetch_only
    fi
}

phase_prepare() {
    local splits_args=() download_args=() synthetic_args=()
    [[ -n "$SYNTHETIC_IMAGES" ]] && synthetic_args=(--synthetic_images "$SYNTHETIC_IMAGES")
    [[ -n "$SPLITS" ]] && splits_args=(--splits $SPLITS)
    [[ "$DOWNLOAD" == 1 ]] && download_args=(--download)
    if [[ -z "$MODEL" ]]; then
        fetch_data   # the train phase embeds with the dual encoder it trains
        return
    fi
    # shellcheck disable=SC2086
    "$PY" prepare_data.py --dataset "$DATASET" --data_dir "$DATA_DIR" ${download_args[@]+"${download_args[@]}"} \
        ${splits_args[@]+"${splits_args[@]}"} ${synthetic_args[@]+"${synthetic_args[@]}"} --model "$MODEL" \
        --output_dir "$EXPORT_DIR" \
        --device "$DEVICE" --num_workers "$NUM_WORKERS" --seed "$SEED" $PREPARE_ARGS
}

phase_train() {
    local exports="" done=1 tag run dim f
    for split in $FIT_SPLIT $SELECT_SPLIT $EVAL_SPLIT; do [[ " $exports " == *" $split "* ]] || exports="$exports $split"; done
    # shellcheck disable=SC2086
    trained_exports $exports
    for f in "${EXPORTS[@]}"; do [[ -f "$f" ]] || done=0; done
    if [[ $done == 1 ]]; then
        tag=$(basename "${EXPORTS[0]}"); tag=${tag#dual-}; tag=${tag%_*.h5}; run=${tag%-d*}; dim=${tag##*-d}
        say "train: $run d$dim already exported (delete $MODEL_DIR/$run/d$dim to retrain), skipped"
        return
    fi
    # --resume: a run stopped by the time limit continues where it stopped (a new run simply starts)
    "$PY" train_dual_encoder.py "${TRAIN_FLAGS[@]}" --resume
}

# The SELECT_SPLIT hand-off files that exist, in SELECT_FILES (none when DATA_PATH names the files, SELECT_SPLIT is
# empty or is EVAL_SPLIT): the sweep runs them too, and the analysis chooses its answers on them.
select_files() {
    local f
    SELECT_FILES=()
    [[ -z "$DATA_PATH" && -n "$SELECT_SPLIT" && "$SELECT_SPLIT" != "$EVAL_SPLIT" ]] || return 0
    handoff_files "$SELECT_SPLIT"
    for f in "${HANDOFF[@]}"; do [[ -f "$f" ]] && SELECT_FILES+=("$f"); done
    [[ ${#SELECT_FILES[@]} -gt 0 ]] || say "SELECT_SPLIT=$SELECT_SPLIT: no hand-off file of that split (${HANDOFF[*]:-none});" \
        "the answers are chosen on $EVAL_SPLIT, the split they report"
    return 0
}

phase_experiments() {
    local shard="0/1" data_paths=() fit_args=() f
    if [[ -n "$DATA_PATH" ]]; then split_paths "$DATA_PATH"; data_paths=("${PATHS[@]}")
    else
        select_files
        handoff_files "$EVAL_SPLIT"; data_paths=(${SELECT_FILES[@]+"${SELECT_FILES[@]}"} "${HANDOFF[@]}")
    fi
    if [[ -n "$FIT_PATH" ]]; then
        split_paths "$FIT_PATH"; fit_args=(--fit_path "${PATHS[@]}")
    elif [[ -n "$FIT_SPLIT" ]]; then
        handoff_files "$FIT_SPLIT"
        for f in "${HANDOFF[@]}"; do [[ -f "$f" ]] && fit_args+=("$f"); done
        [[ ${#fit_args[@]} -gt 0 ]] && fit_args=(--fit_path "${fit_args[@]}")
    fi
    if [[ "$SUBMIT_JOB_ROLE" == sweep && -n "$TASK_INDEX" ]]; then shard="$TASK_INDEX/$ARRAY"; fi
    say "experiments: shard $shard of ${data_paths[*]}"
    # shellcheck disable=SC2086
    "$PY" run_experiments.py --data_path "${data_paths[@]}" ${fit_args[@]+"${fit_args[@]}"} --output_dir "$RESULT_DIR" \
        --embedding_dims $EMBEDDING_DIMS --precisions $PRECISIONS --candidate_sizes $CANDIDATE_SIZES \
        --recall_k $RECALL_K --index $INDEX --threads "$THREADS" --seed "$SEED" --shard "$shard" $EXPERIMENT_ARGS
}

phase_analyze() {
    local select_args=()
    select_files
    [[ ${#SELECT_FILES[@]} -gt 0 ]] && select_args=(--select_on "$SELECT_SPLIT")
    # shellcheck disable=SC2086
    "$PY" analyze_results.py --results_dir "$RESULT_DIR" --output_path "$RESULT_DIR/experiment_summary.json" \
        ${select_args[@]+"${select_args[@]}"} $ANALYZE_ARGS
}

backup_results() {
    # A dated copy of result/ (without older backups), written under a temporary name and renamed.
    mkdir -p "$BACKUP_DIR"
    local archive="$BACKUP_DIR/result-$TIMESTAMP${JOB_ID:+-job${JOB_ID%%.*}}.tar.gz" status=0
    local backups_rel
    backups_rel=$(cd "$BACKUP_DIR" && pwd)
    backups_rel=${backups_rel#"$(cd "$RESULT_DIR" && pwd)"/}
    # exit status 1 = a file (this job's own log) changed while being read: the copy is still usable
    tar --warning=no-file-changed --exclude="./$backups_rel" -C "$RESULT_DIR" -czf "$archive.part" . || status=$?
    [[ $status -le 1 ]] || { rm -f "$archive.part"; return $status; }
    mv "$archive.part" "$archive"
    say "backup: $archive"
}

# ------------------------------------------------------------------------------------------------ array submission
detect_scheduler() {
    if [[ -n "$SCHEDULER" ]]; then echo "$SCHEDULER"; return; fi
    if command -v sbatch >/dev/null 2>&1; then echo slurm
    elif command -v qsub >/dev/null 2>&1; then
        # SGE's qsub names itself (or its qmaster) in its help; PBS's does not
        if [[ -n "${SGE_ROOT:-}" ]] || qsub -help 2>&1 | head -3 | grep -qiE "grid ?engine|^(SGE|GE|OGS|UGE) [0-9]|qmaster"
        then echo sge; else echo pbs; fi
    else die "ARRAY=$ARRAY: no sbatch or qsub on PATH (set SCHEDULER, or run without ARRAY)"; fi
}

# submit ROLE PHASES DEPENDENCY [array] -> prints the job id; the status is sbatch/qsub's (with WAIT=1: the job's)
submit() {
    local role=$1 phases=$2 after=$3 array=${4:-} name="$JOB_NAME-$1" opts=() out status=0
    case $SCHEDULER_KIND in
    slurm)
        opts=(--parsable --export=ALL --job-name="$name")
        if [[ -n "$array" ]]; then opts+=(--array="0-$((ARRAY - 1))" --output="$LOG_DIR/%x-%A_%a.out")
        else opts+=(--output="$LOG_DIR/%x-%j.out"); fi
        [[ -n "$after" ]] && opts+=(--dependency="afterok:$after")
        [[ $role == setup && "$GPUS" -gt 0 ]] && opts+=(--gres="gpu:$GPUS")
        [[ $role == analyze && "$WAIT" == 1 ]] && opts+=(--wait)
        # shellcheck disable=SC2086
        out=$(PHASES=$phases PIPELINE_PHASES=$PIPELINE_PHASES SUBMIT_JOB_ROLE=$role sbatch "${opts[@]}" \
            $SUBMIT_ARGS "$SCRIPT") || status=$?
        echo "${out%%;*}" | grep -E '^[0-9]' | tail -1 ;;
    sge)
        opts=(-terse -V -cwd -N "$name" -o "$LOG_DIR/" -j y)
        [[ -n "$array" ]] && opts+=(-t "1-$ARRAY")
        [[ -n "$after" ]] && opts+=(-hold_jid "$after")
        [[ $role == setup && "$GPUS" -gt 0 ]] && opts+=(-l "gpu=$GPUS")
        [[ $role == analyze && "$WAIT" == 1 ]] && opts+=(-sync y)
        # shellcheck disable=SC2086
        out=$(PHASES=$phases PIPELINE_PHASES=$PIPELINE_PHASES SUBMIT_JOB_ROLE=$role qsub "${opts[@]}" \
            $SUBMIT_ARGS "$SCRIPT") || status=$?
        echo "$out" | grep -E '^[0-9]' | head -1 | cut -d. -f1 ;;   # "123.1-8:1" -> 123
    pbs)
        opts=(-V -N "$name" -o "$LOG_DIR/" -j oe)
        # PBS arrays need at least two sub-jobs; one shard is a plain job
        [[ -n "$array" && $ARRAY -gt 1 ]] && opts+=(-J "0-$((ARRAY - 1))")
        [[ -n "$after" ]] && opts+=(-W "depend=afterok:$after")
        [[ $role == setup && "$GPUS" -gt 0 ]] && opts+=(-l "select=1:ngpus=$GPUS")
        [[ $role == analyze && "$WAIT" == 1 ]] && opts+=(-W block=true)
        # shellcheck disable=SC2086
        out=$(PHASES=$phases PIPELINE_PHASES=$PIPELINE_PHASES SUBMIT_JOB_ROLE=$role qsub "${opts[@]}" \
            $SUBMIT_ARGS "$SCRIPT") || status=$?
        echo "$out" | grep -E '^[0-9]' | head -1 ;;
    esac
    return $status
}

submit_array() {
    SCHEDULER_KIND=$(detect_scheduler)
    SCRIPT="$REPO_DIR/submit_job.sh"
    has_phase experiments || die "ARRAY=$ARRAY: PHASES must include 'experiments' (it is what the array runs)"
    if has_phase prefetch; then CURRENT_PHASE=prefetch; phase_prefetch; fi
    local setup_phases="" after="" setup_id="" sweep_id="" analyze_id=""
    for phase in prepare train; do has_phase $phase && setup_phases="$setup_phases $phase"; done
    CURRENT_PHASE="submit"
    if [[ -n "$setup_phases" ]]; then
        setup_id=$(submit setup "${setup_phases# }" "") || die "submitting the$setup_phases job failed"
        say "submitted $JOB_NAME-setup ($setup_phases ) as job $setup_id"
        after=$setup_id
    fi
    sweep_id=$(submit sweep experiments "$after" array) || die "submitting the sweep array failed"
    say "submitted $JOB_NAME-sweep (experiments, $ARRAY shards) as array job $sweep_id"
    if has_phase analyze; then
        [[ "$WAIT" == 1 ]] && say "waiting for the analysis job (WAIT=1)"
        local status=0
        analyze_id=$(submit analyze analyze "$sweep_id") || status=$?
        [[ -n "$analyze_id" ]] || die "submitting the analysis job failed"
        say "submitted $JOB_NAME-analyze (after array job $sweep_id) as job $analyze_id"
        if [[ "$WAIT" == 1 ]]; then
            local log="$LOG_DIR/$JOB_NAME-analyze-$analyze_id.out"
            # `sbatch --wait` returns 0 also for a job cancelled before it started (a failed dependency),
            # so success is the job's own last line in its log
            if [[ $status -ne 0 ]] || { [[ $SCHEDULER_KIND == slurm ]] && ! grep -q "^submit_job: finished" "$log" 2>/dev/null; }; then
                echo "submit_job: FAILED: analysis job $analyze_id did not finish (exit $status); a failed or cancelled" \
                     "earlier job cancels it: see $LOG_DIR/" >&2
                exit 1
            fi
            say "analysis job $analyze_id finished: $RESULT_DIR/experiment_summary.json"
        fi
    fi
    say "submitted: logs in $LOG_DIR/, results in $RESULT_DIR/"
}

# ------------------------------------------------------------------------------------------------ main
setup_environment
if [[ $OFFLINE == 1 ]]; then
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
export PYTHONUNBUFFERED=1   # log lines appear as they happen, also in scheduler log files

if [[ $SCHEDULER_RUNNING == none ]]; then where="local run"; else
    where="$SCHEDULER_RUNNING job $JOB_ID${TASK_INDEX:+ array task $TASK_INDEX}${SUBMIT_JOB_ROLE:+ ($SUBMIT_JOB_ROLE)}"; fi
say "$where on $(hostname) in $REPO_DIR; phases: $PHASES; dataset $DATASET; model ${MODEL:-dual encoder, recipe $RECIPE${RUN_NAME:+, run $RUN_NAME}};" \
    "python $("$PY" -c 'import sys; print(sys.executable)'); offline=$OFFLINE"

# Wrong settings fail here, in one line, before anything runs.
DATASETS=$("$PY" -c 'from retrieval.data import DATASETS; print(*DATASETS)')
[[ " $DATASETS " == *" $DATASET "* ]] || die "DATASET=$DATASET: unknown dataset (choose from $DATASETS)"
if has_phase experiments || has_phase analyze; then require_writable RESULT_DIR "$RESULT_DIR"; fi
if has_phase train || { has_phase prepare && [[ -n "$MODEL" ]]; }; then require_writable EXPORT_DIR "$EXPORT_DIR"; fi
if has_phase train; then require_writable MODEL_DIR "$MODEL_DIR"; fi
if [[ "$DOWNLOAD" == 1 ]] && { has_phase prefetch || has_phase prepare; }; then require_writable DATA_DIR "$DATA_DIR"; fi

if [[ $ARRAY -gt 0 && -z "$SUBMIT_JOB_ROLE" ]]; then
    submit_array
    exit 0
fi

for phase in prefetch prepare train experiments analyze; do
    has_phase $phase || continue
    CURRENT_PHASE=$phase
    start=$SECONDS
    say "phase $phase: started"
    "phase_$phase"
    say "phase $phase: done in $((SECONDS - start)) s"
done
if [[ "$BACKUP" == 1 ]] && has_phase analyze; then
    CURRENT_PHASE=backup
    backup_results
fi
CURRENT_PHASE=done
say "finished: $PHASES${JOB_ID:+ [job $JOB_ID]}"
