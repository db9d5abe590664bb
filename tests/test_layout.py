"""The layout promises of docs/design/architecture.md: small modules, no import cycle among onnxlr's
modules, and every module and reason code named in the documentation.

Imports are read from the source (ast), those inside functions included, so a cycle that only
bites at run time is caught here too. Modules are found on the file system, subpackages included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600


PACKAGES = ((ROOT / "onnxlr", "onnxlr"), (ROOT / "passes", "onnxlr.passes"))


def package_modules() -> dict[str, Path]:
    """Module name -> file for every module of the installed package, subpackages included (passes/ is
    onnxlr.passes; a package's __init__.py is the package itself)."""
    modules = {}
    for folder, package in PACKAGES:
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def documented_name(module: str) -> str:
    """How the architecture page names a module: its dotted path inside its package (onnxlr.factorize.pipeline ->
    factorize.pipeline, onnxlr.passes.matmul -> matmul, onnxlr.api -> api)."""
    if module == "onnxlr.passes":
        return "passes"
    for _, package in sorted(PACKAGES, key=lambda item: -len(item[1])):
        if module.startswith(package + "."):
            return module[len(package) + 1:]
    return module


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (relative imports resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from onnxlr import cost` imports the module onnxlr.factorize.cost; `from onnxlr.x import f` imports onnxlr.x.
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # Importing a submodule runs its parent packages first, except the packages the importer
            # itself lives in (already running) and the root package (every module runs it: it is the
            # public facade that imports the stages).
            while candidate and candidate != "onnxlr" and not package.startswith(candidate):
                if candidate in known:
                    found.add(candidate)
                candidate = candidate.rpartition(".")[0]
    found.discard(name)
    return found


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle_among_the_package_modules():
    modules = package_modules()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    assert graph["onnxlr.factorize.pipeline"] >= {"onnxlr.factorize.targets", "onnxlr.factorize.plan", "onnxlr.factorize.rewrite"}  # the reader sees edges
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "a.py"
    module.write_text("def f():\n    from onnxlr.factorize import plan\n    from .b import x\n")
    found = imported_modules("onnxlr.a", module, {"onnxlr.factorize.plan", "onnxlr.b"})
    assert found == {"onnxlr.factorize.plan", "onnxlr.b"}


def test_presentation_stays_out_of_the_library_modules():
    """Library modules never import the rendering modules (onnxlr.render: report, html_*) or the CLI."""
    modules = package_modules()
    presentation = {name for name in modules if name.startswith(("onnxlr.render", "onnxlr.cli"))}
    library = set(modules) - presentation - {"onnxlr", "onnxlr.__main__"}
    leaks = {name: sorted(imported_modules(name, modules[name], set(modules)) & presentation) for name in library}
    assert not {name: found for name, found in leaks.items() if found}


def test_the_reason_code_page_lists_every_code():
    from onnxlr.passes import REASON_CODES

    page = (ROOT / "docs" / "reference" / "reason-codes.md").read_text(encoding="utf-8")
    missing = [code for code in REASON_CODES if f"| `{code}` |" not in page]
    assert not missing, f"docs/reference/reason-codes.md lacks {missing}: run python scripts/gen_docs.py"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "design" / "architecture.md").read_text(encoding="utf-8")
    names = sorted({documented_name(module) for module in package_modules()} - {"onnxlr"})
    unlisted = [name for name in names if not any(part.startswith("_") for part in name.split("."))
                and not re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", page)]
    assert not unlisted, f"docs/design/architecture.md does not name {unlisted}"


def test_documented_names_are_paths_inside_the_package():
    assert documented_name("onnxlr.factorize.pipeline") == "factorize.pipeline"
    assert documented_name("onnxlr.passes.matmul") == "matmul"
    assert documented_name("onnxlr.passes") == "passes"
    assert documented_name("onnxlr.kinds.pairs") == "kinds.pairs"
    assert documented_name("onnxlr.passes.sub.rule") == "sub.rule"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_answers_help(script):
    """Scripts import the package's modules by name: a moved function must not break them silently."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_weight_groups_are_read_only_after_selection():
    """Issue 31: stages return their results instead of writing them onto the shared WeightGroup: the latency
    stage's times and ladders (onnxlr.timing.measured.Measured), the calibration statistics (datafit.Calibrated),
    the sensitivities (pipeline.Planned), the plan's decisions and the SVDs behind them (onnxlr.factorize.decisions,
    onnxlr.factorize.svd). A group is frozen once selected, and so is each decision."""
    import dataclasses

    import numpy as np
    from graphs import parse_text
    from onnxlr.passes import Context

    from onnxlr.factorize.decisions import Decision, Plan
    from onnxlr.factorize.groups import WeightGroup
    from onnxlr.factorize.targets import find_targets
    from onnxlr.settings import Settings

    fields = {field.name for field in dataclasses.fields(WeightGroup)}
    assert fields == {"targets", "flipped", "schemes", "reader_options", "biases", "excluded"}
    model = parse_text("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[2,8] x) => (float[2,8] y) { [mm] y = MatMul(x, W) }""",
                       W=np.eye(8, dtype=np.float32))
    (group,) = find_targets(model, Settings.of(), Context(shapes={}, opset=17)).groups
    for name, value in (("rank", 4), ("scheme", None), ("gram", np.eye(8)), ("reason", "x"), ("targets", [])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(group, name, value)
    plan = Plan([group])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan[group].rank = 4  # type: ignore[misc]
    plan.choose(group, group.schemes[0], 4)
    assert plan[group] == Decision(scheme=group.schemes[0], rank=4) and plan.factorized(group)


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly (passes/ is mapped to onnxlr.passes); an editable install finds
    a new subpackage anyway, a built wheel would silently leave it out."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(("onnxlr", *init.parent.relative_to(ROOT / "onnxlr").parts)).rstrip(".")
             for init in (ROOT / "onnxlr").rglob("__init__.py")}
    assert found | {"onnxlr.passes"} == listed
