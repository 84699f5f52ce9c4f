"""The project as a package: `pip install -e .` into a new virtualenv that holds only torch, then the core
imports and every console script answers --help (no training dependency is needed for either)."""
import subprocess
import venv

import pytest

from conftest import REPO

CONSOLE_SCRIPTS = ("velora-train", "velora-eval", "velora-export", "velora-memory", "velora-plan")


@pytest.mark.slow
def test_pip_install_editable_into_a_fresh_venv_with_only_torch(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, bin_dir = env_dir / "bin" / "python", env_dir / "bin"

    def pip(*args):
        p = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    torch_version = __import__("torch").__version__.split("+")[0]
    pip(f"torch=={torch_version}")                      # first, as scripts/setup.sh does (no CUDA build)
    pip("-e", str(REPO))
    code = ("import common, velora, torch; from velora import VeLoRAConfig, apply_velora; "
            "m = torch.nn.Sequential(); print(common.__version__)")
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == __import__("common").__version__, p.stderr[-3000:]
    p = subprocess.run([str(py), "-c", "import deepspeed"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode != 0                            # really only torch: the training extra is not installed
    for name in CONSOLE_SCRIPTS:
        p = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True, cwd=tmp_path,
                           timeout=300)
        assert p.returncode == 0 and "usage:" in p.stdout, (name, p.stdout[-2000:], p.stderr[-2000:])


def test_console_scripts_are_declared_and_importable():
    """pyproject.toml's entry points name functions that exist (checked without installing)."""
    import importlib
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(CONSOLE_SCRIPTS)
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.parametrize("name", CONSOLE_SCRIPTS)
def test_every_command_lives_in_training_commands_and_answers_help(name, capsys):
    """One home for the entry points: each console script but train_c4.py's is a module of training/commands/,
    and its main answers --help (in process, so without installing)."""
    import importlib
    import tomllib

    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name].split(":")
    assert module == "train_c4" or module.startswith("training.commands."), module
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), func)(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_no_script_imports_another_script():
    """What scripts share lives in the package: no scripts/*.py puts scripts/ on sys.path or imports a sibling."""
    scripts = REPO / "scripts"
    names = {p.stem for p in scripts.glob("*.py")}
    for path in scripts.glob("*.py"):
        text = path.read_text()
        assert 'REPO / "scripts"' not in text and "resolve().parent))" not in text, path.name
        for line in text.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in names, (path.name, line)
