"""The house's import rules, read off the source with `ast`: a module under training/ reaches another
sub-package of training/ only through the names its `__init__.py` exports, never a private one; the lower
floors (common/, data/, model/, velora/) import nothing from training/; and reading a config imports no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TRAINING = REPO / "training"
LOWER_FLOORS = ("common", "data", "model", "velora")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False):
    """(imported module, imported names) of every import in `source`, function-level ones included; relative
    imports resolved against `module` (a package when `is_package`)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target, [alias.name for alias in node.names]


def sub_packages(root: Path = TRAINING) -> set[str]:
    return {p.parent.name for p in root.glob("*/__init__.py")}


def violations(source: str, module: str, is_package: bool, subs: set[str], root: Path = TRAINING) -> list[str]:
    """What `module` (inside training/) imports from a sibling sub-package beyond its public names."""
    parts = module.split(".")
    own = parts[1] if len(parts) > 2 or (is_package and len(parts) == 2) else None   # None: training/'s top level
    bad = []
    for target, names in imports(source, module, is_package):
        parts = target.split(".")
        if parts[0] != "training" or len(parts) < 2:
            continue
        sub = parts[1]
        if sub not in subs or sub == own:
            if sub != own and any(n.startswith("_") for n in names):
                bad.append(f"{target}: private {', '.join(n for n in names if n.startswith('_'))}")
            continue
        if len(parts) > 2:
            bad.append(f"{target}: internal module of training.{sub}")
        for n in names:
            if n.startswith("_"):
                bad.append(f"{target}: private name {n}")
            elif (root / sub / f"{n}.py").is_file() or (root / sub / n / "__init__.py").is_file():
                bad.append(f"{target}: internal module {n} of training.{sub}")
    return bad


def test_training_modules_use_only_the_public_names_of_sibling_sub_packages():
    subs = sub_packages()
    assert {"state", "hf", "optim", "plan", "gpu_check"} <= subs
    offenders = {}
    for path in sorted(TRAINING.rglob("*.py")):
        module = _module_name(path)
        bad = violations(path.read_text(), module, path.name == "__init__.py", subs)
        if bad:
            offenders[path.relative_to(REPO).as_posix()] = bad
    assert not offenders, f"imports past a sub-package's public names: {offenders}"


def test_the_lower_floors_import_nothing_from_training():
    offenders = {}
    for floor in LOWER_FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            found = [t for t, _ in imports(path.read_text(), _module_name(path), path.name == "__init__.py")
                     if t == "training" or t.startswith("training.")]
            if found:
                offenders[path.relative_to(REPO).as_posix()] = found
    assert not offenders, f"a lower floor imports training/: {offenders}"


@pytest.mark.parametrize("module, is_package, source, found", [
    ("training.run", False, "from .state import save_checkpoint", []),
    ("training.run", False, "from .state.save import save_checkpoint", ["training.state.save: internal module"]),
    ("training.run", False, "import training.state.save", ["training.state.save: internal module"]),
    ("training.run", False, "from training.state import _commit", ["training.state: private name _commit"]),
    ("training.run", False, "from training.state import scratch", ["training.state: internal module scratch"]),
    ("training.hf.load", False, "def f():\n    from ..state.tags import read_latest", ["training.state.tags:"]),
    ("training.hf.load", False, "from .files import write_hf_files", []),
    ("training.state", True, "from .save import _commit", []),
    ("training.hf.load", False, "from ..config import _check", ["training.config: private _check"]),
    ("training.state.save", False, "from ..collectives import barrier", []),
])
def test_the_scan_sees_every_way_in(tmp_path, module, is_package, source, found):
    for sub in ("state", "hf"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "__init__.py").write_text("")
    (tmp_path / "state" / "scratch.py").write_text("")
    bad = violations(source, module, is_package, {"state", "hf"}, tmp_path)
    assert len(bad) == len(found) and all(b.startswith(f) for b, f in zip(bad, found)), bad


def test_a_config_error_comes_before_torch_is_imported():
    """train_c4.py reads the config before it imports torch (config errors at once): training.config must
    not import training.state, whose modules import torch, at import time."""
    code = ("import sys, train_c4, training.config, training.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
