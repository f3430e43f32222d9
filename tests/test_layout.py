"""The package's shape: imports flow one way (no cycle, also counting imports inside functions), and
library code raises typed errors instead of exiting the process; the scripts' --help shows real defaults."""
import ast
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "retrieval")


def package_modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def imported_modules(path, modules):
    """Every retrieval module `path` imports, wherever the import statement sits (module level or inside
    a function)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("retrieval.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "retrieval":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retrieval."):
            found.add(node.module.split(".")[1])
    return found & set(modules)


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    modules = package_modules()
    graph = {m: imported_modules(os.path.join(PACKAGE, f"{m}.py"), modules) - {m} for m in modules}
    assert len(modules) > 10 and graph["models"] >= {"checkpoint", "encoders"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_library_code_never_exits_the_process():
    # Scripts turn retrieval.errors.UserError into `error: ...` and an exit code; the package only raises.
    offenders = []
    for module in package_modules():
        path = os.path.join(PACKAGE, f"{module}.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                names.append(getattr(target, "id", getattr(target, "attr", "")))
            if isinstance(node, ast.ClassDef):
                names += [getattr(base, "id", "") for base in node.bases]
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "exit":
                names.append("sys.exit")
            if {"SystemExit", "sys.exit"} & set(names) and module != "errors":
                offenders.append(f"{module}.py:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("script", ["prepare_data", "train_dual_encoder", "run_experiments", "analyze_results",
                                    "search"])
def test_help_shows_real_defaults_only(script, capsys):
    """--help of every script: no empty '(default: )', and the real defaults where there are some."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "(default: )" not in text and "(default: None)" not in text and "(default: False)" not in text
    if script in ("prepare_data", "train_dual_encoder", "run_experiments"):
        assert re.search(r"--seed SEED\s.*\(default: 0\)", text, re.S)


def readme_code_map():
    """{module: part} from README.md's Code map table, and the parts in their order there."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text[text.index("| part | module | holds |"):]
    table = table[:table.index("\n\n")]
    parts, order = {}, []
    for line in table.splitlines()[2:]:
        part, modules = [cell.strip() for cell in line.strip("|").split("|")][:2]
        if part:
            order.append(part)
        parts.update({name: order[-1] for name in re.findall(r"`(\w+)\.py`", modules)})
    return parts, order


def test_the_readme_code_map_names_every_module_and_each_part_imports_only_parts_above_it():
    parts, order = readme_code_map()
    modules = package_modules()
    assert sorted(parts) == modules, "README Code map and retrieval/ disagree"
    upward = [f"{m} ({parts[m]}) imports {d} ({parts[d]})" for m in modules
              for d in imported_modules(os.path.join(PACKAGE, f"{m}.py"), modules) - {m}
              if order.index(parts[d]) > order.index(parts[m])]
    assert upward == []
