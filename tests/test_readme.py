"""The README's commands stay true: every flag a README command passes to a script is one that script's
--help lists, and every variable a README command sets for submit_job.sh is a knob the script reads."""
import contextlib
import importlib
import io
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """Each command line of the README's indented code blocks, continuation lines joined."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands, current = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            current = ""
            continue
        current += line.strip().split("   #")[0].rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def script_calls():
    """(script path, flags) for every `python[3] <script>.py ...` in the README. bench/bench_train.py passes
    what follows its --extra to train_dual_encoder.py, so those flags are checked against that script."""
    calls = []
    for command in readme_commands():
        for match in re.finditer(r"(?:python3?|torchrun(?: --\S+)*) ((?:bench/)?[a-z_]+\.py)([^|;&]*)", command):
            own, _, extra = match.group(2).partition(" --extra ") if match.group(1) == "bench/bench_train.py" \
                else (match.group(2), "", "")
            calls.append((match.group(1), flags_in(own + (" --extra" if extra else ""))))
            if extra:
                calls.append(("train_dual_encoder.py", flags_in(extra)))
    return calls


def flags_in(text):
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z_]*", text)))


def help_text(script):
    sys.path.insert(0, os.path.join(ROOT, os.path.dirname(script)))
    try:
        module = importlib.import_module(os.path.basename(script)[:-3])
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return out.getvalue()


CALLS = script_calls()


def test_the_readme_has_commands_to_check():
    scripts = {script for script, _ in CALLS}
    assert {"prepare_data.py", "train_dual_encoder.py", "run_experiments.py", "analyze_results.py",
            "search.py"} <= scripts


@pytest.mark.parametrize("script", sorted({script for script, _ in CALLS}))
def test_every_readme_flag_exists(script):
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z_]*", help_text(script)))
    used = {flag for name, flags in CALLS if name == script for flag in flags}
    assert used <= options, f"{script}: README flags not in --help: {sorted(used - options)}"


def test_every_readme_knob_of_submit_job_exists():
    script = open(os.path.join(ROOT, "submit_job.sh"), encoding="utf-8").read()
    knobs = set(re.findall(r"\$\{([A-Z_]+)[:-]", script)) | set(re.findall(r"^([A-Z_]+)=", script, re.M))
    used = set()
    for command in readme_commands():
        if "submit_job.sh" in command:
            used |= set(re.findall(r"(?:^|\s)([A-Z][A-Z_]+)=", command.split("submit_job.sh")[0]))
    assert "DATASET" in used and used <= knobs, f"README sets unknown knobs: {sorted(used - knobs)}"
