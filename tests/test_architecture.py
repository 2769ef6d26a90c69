"""The package's import graph, read with `ast` from src/masknet (nothing is imported or run).

Two rules (the brief's style rules; issue #15, "Done when"):
  * a module never imports a layer above its own. Bottom to top:
        base (masknet's top-level modules: config, errors, integrity, the package itself)
        < data < models < runs (the run folder) < training < serving / experiments / bench / tuning < cli / estimator / __main__
    (modules of one layer may import each other);
  * a module never imports another module's private name (`_name`; dunders such as
    `__version__` are public), nor reads one as an attribute of an imported masknet module.
Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {
    "data": 1,
    "models": 2,
    "runs": 2.5,  # masknet.runs, the run folder: builds models, beneath everything that reads or writes runs
    "training": 3,
    "serving": 4,
    "experiments": 4,
    "bench": 4,
    "tuning": 4,  # hyper-parameter search over training runs (branch `defaults`)
    "cli": 5,
    "estimator": 5,
    "__main__": 5,
}
LAYER_NAMES = {0: "base", 1: "data", 2: "models", 2.5: "runs", 3: "training", 4: "serving/experiments/bench/tuning", 5: "cli"}

# No upward import is allowed: the last one (training.run -> serving.bundle, to seal a run) went
# when masknet.runs became the run-folder layer beneath training and serving (issue #15 item 1).
ALLOWED_UPWARD: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # the masknet module imported from (or imported)
    name: str | None  # the name imported from it (None for `import masknet.x`)
    line: int
    where: str  # file:line, the file relative to the source root


def module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/masknet."""
    out = {}
    for path in sorted((src / "masknet").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(importer: str, path: Path, modules: dict[str, Path], src: Path = SRC) -> tuple[list[Import], list[str]]:
    """The masknet imports of one module, and its reads of a private attribute of an imported
    masknet module (`readers._helper()` after `from ..data import readers`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    rel = path.relative_to(src).as_posix()
    found: list[Import] = []
    bound_modules: dict[str, str] = {}  # local name -> masknet module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "masknet":
                    found.append(Import(importer, a.name, None, node.lineno, f"{rel}:{node.lineno}"))
                    bound_modules[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(importer, is_package, node)
            if target.split(".")[0] != "masknet":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in modules:  # `from ..data import readers`: the module masknet.data.readers
                    found.append(Import(importer, sub, None, node.lineno, f"{rel}:{node.lineno}"))
                    bound_modules[a.asname or a.name] = sub
                else:
                    found.append(Import(importer, target, a.name, node.lineno, f"{rel}:{node.lineno}"))
    private_reads = [
        f"{rel}:{node.lineno}: {node.value.id}.{node.attr} ({bound_modules[node.value.id]})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in bound_modules and _is_private(node.attr)
    ]
    return found, private_reads


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return 0  # a top-level module (config, errors, integrity, ...): the base


def check(src: Path = SRC) -> tuple[list[str], list[str], list[str]]:
    """(upward imports, private-name imports, unplaced subpackages), each as readable lines."""
    modules = module_names(src)
    upward, private, unplaced = [], [], []
    for sub in sorted({m.split(".")[1] for m in modules if m.count(".") >= 1}):
        if (src / "masknet" / sub).is_dir() and sub not in LAYERS:
            unplaced.append(f"masknet.{sub}: a subpackage with no layer in LAYERS")
    for importer, path in modules.items():
        found, private_reads = imports_of(importer, path, modules, src)
        private += private_reads
        for imp in found:
            if imp.name is not None and _is_private(imp.name):
                private.append(f"{imp.where}: {imp.name} from {imp.target}")
            up = layer_of(imp.target) > layer_of(importer)
            if up and (importer, imp.target) not in ALLOWED_UPWARD:
                upward.append(f"{imp.where}: {importer} ({LAYER_NAMES[layer_of(importer)]}) imports "
                              f"{imp.target} ({LAYER_NAMES[layer_of(imp.target)]})")
    return upward, private, unplaced


def test_no_module_imports_a_layer_above_its_own():
    upward, _, unplaced = check()
    assert not unplaced, unplaced
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_module_imports_another_modules_private_name():
    _, private, _ = check()
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_training_seals_runs_without_serving():
    """Issue #15 item 1: training writes and seals its run folder through masknet.runs, and serving
    loads through it: training imports nothing of serving, and there is one model loader."""
    modules = module_names(SRC)
    for name in ("masknet.training.run", "masknet.training.runfolder", "masknet.training.checkpoint"):
        found, _ = imports_of(name, modules[name], modules)
        assert not [i for i in found if i.target.startswith("masknet.serving")], name
    loaders = [m for m, path in modules.items() if "def load_model(" in path.read_text() or "def verify_and_load(" in path.read_text()]
    builds = [m for m, path in modules.items() if "load_state_dict(load_file(" in path.read_text()]
    assert builds == ["masknet.runs"], builds  # the only place a bundle's weights are loaded into a model
    assert set(loaders) <= {"masknet.runs", "masknet.serving.bundle"}, loaders


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"masknet/__init__.py": "", "masknet/data/__init__.py": "", "masknet/models/__init__.py": "",
                      "masknet/training/__init__.py": "", "masknet/serving/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """The walk itself: each rule fires on a planted case (relative, absolute, lazy and
    attribute forms), and not on the allowed ones."""
    src = _package(tmp_path, {
        "masknet/config.py": "def _helper(): pass\n",
        "masknet/data/readers.py": "def _first(): pass\ndef first(): pass\n",
        "masknet/data/prepare.py": "from .readers import first\nfrom ..config import _helper\n",
        "masknet/models/base.py": "def f():\n    from masknet.training import trainer\n",
        "masknet/models/other.py": "from ..data import readers\nreaders._first()\nfrom masknet import __version__\n",
        "masknet/training/trainer.py": "from ..models.base import f\nfrom ..data.readers import first\n",
        "masknet/training/run.py": "from ..serving.bundle import seal\n",
        "masknet/serving/bundle.py": "def seal(): pass\n",
        "masknet/tuning/study.py": "from ..training.trainer import f\n",
        "masknet/newpkg/x.py": "",
    })
    upward, private, unplaced = check(src)
    assert sorted(u.split(":")[0] for u in upward) == ["masknet/models/base.py", "masknet/training/run.py"]
    assert "imports masknet.training.trainer (training)" in upward[0]
    assert len(private) == 2
    assert any("prepare.py:2: _helper from masknet.config" in p for p in private)
    assert any("other.py:2: readers._first (masknet.data.readers)" in p for p in private)
    assert unplaced == ["masknet.newpkg: a subpackage with no layer in LAYERS"]


LONG_FUNCTION_LINES = 80
SHORT_FUNCTION_PACKAGES = ("",)  # issue #15: the whole package; each concern a named helper


def long_functions(src: Path = SRC, packages: tuple[str, ...] = SHORT_FUNCTION_PACKAGES) -> list[str]:
    """Functions over LONG_FUNCTION_LINES lines (decorators excluded) whose docstring does not say
    why ("long because ...")."""
    out = []
    for pkg in packages:
        root = src / "masknet" / pkg
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root] if root.exists() else []):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    why = "long because" in (ast.get_docstring(node) or "")
                    if lines > LONG_FUNCTION_LINES and not why:
                        out.append(f"{path.relative_to(src)}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_function_over_80_lines_anywhere_in_the_package():
    assert not long_functions(), "\n".join(long_functions())


def test_the_length_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONG_FUNCTION_LINES))
    src = _package(tmp_path, {"masknet/training/long.py": f"def f():\n{body}\n",
                              "masknet/training/why.py": f'def g():\n    """long because: one table."""\n{body}\n'})
    assert long_functions(src, ("training",)) == [f"masknet/training/long.py:1 f: {LONG_FUNCTION_LINES + 1} lines"]


# The files of a run folder (masknet.runs names them; issue #15 item 1). Other modules name them
# through runs' constants; a bare literal elsewhere is a second place that knows the layout. The
# checkpoint folder's own files (training/checkpoint.py) and a prepared dataset's encoder.json
# (data/) are other folders' files.
RUN_FILE_NAMES = {"config.yaml", "model.json", "metrics.json", "log.jsonl", "reliability.png", "dataset.json"}


def run_file_literals(src: Path = SRC) -> list[str]:
    out = []
    for path in sorted((src / "masknet").rglob("*.py")):
        if path.name == "runs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES:
                out.append(f"{path.relative_to(src)}:{node.lineno} {node.value!r}")
    return out


def test_only_runs_names_the_run_folders_files():
    assert not run_file_literals(), "\n".join(run_file_literals())


def test_the_run_file_check_finds_a_literal(tmp_path):
    src = _package(tmp_path, {"masknet/serving/x.py": 'import json\nNAME = "metrics.json"\n',
                              "masknet/runs.py": 'METRICS = "metrics.json"\n'})
    assert run_file_literals(src) == ["masknet/serving/x.py:2 'metrics.json'"]
