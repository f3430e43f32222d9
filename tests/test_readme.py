"""The README's commands stay true: every flag a README command passes to a script is one that script's
--help lists, and every variable a README command sets for submit_job.sh is a knob the script reads. The
same holds for the pages the README points to (docs/*.md, bench/README.md), and their relative links
resolve (file and heading)."""
import contextlib
import glob
import importlib
import io
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The README and the pages it points to: their commands are checked alike.
DOC_FILES = ["README.md"] + sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))) \
    + ["bench/README.md"]


def readme_commands(page="README.md"):
    """Each command line of a page's indented code blocks (the README's by default), continuation lines joined."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
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


def doc_commands():
    """The command lines of the README and of every page in DOC_FILES."""
    return [command for page in DOC_FILES for command in readme_commands(page)]


def script_calls(commands):
    """(script path, flags) for every `python[3] <script>.py ...` in commands. bench/bench_train.py passes
    what follows its --extra to train_dual_encoder.py, so those flags are checked against that script."""
    calls = []
    for command in commands:
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


CALLS = script_calls(doc_commands())


def test_the_readme_has_commands_to_check():
    scripts = {script for script, _ in script_calls(readme_commands())}
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
    for command in doc_commands():
        if "submit_job.sh" in command:
            used |= set(re.findall(r"(?:^|\s)([A-Z][A-Z_]+)=", command.split("submit_job.sh")[0]))
    assert "DATASET" in used and used <= knobs, f"README sets unknown knobs: {sorted(used - knobs)}"


def test_every_page_has_commands_to_check():
    empty = [page for page in DOC_FILES if page != "docs/benchmark-history.md" and not readme_commands(page)]
    assert not empty, f"pages without an indented command block (is the page parsed?): {empty}"


def heading_anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", DOC_FILES)
def test_every_relative_link_resolves(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(target)
        elif anchor and linked.endswith(".md") and anchor not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{page}: links that do not resolve: {broken}"
