"""Prepare .whl/: the wheels the lent GPU machine lacks, for an offline install by scripts/bench_gpu.sh.

    .venv/bin/python scripts/gpu_wheelhouse.py          # writes .whl/ (git-ignored), prints its size

The lent machine has Python 3.12, torch 2.11, triton 3.6 and sentencepiece, reaches no package index, and
takes at most 64 MiB of carried files. What train_c4.py and the GPU check import beyond that: DeepSpeed
(an sdist on PyPI: built here into a pure-Python wheel with no prebuilt ops, DS_BUILD_OPS=0), numpy,
safetensors, tqdm, transformers (the export's tokenizer files, and galore-torch's version check),
tensorboard (the SummaryWriter; with only absl-py, protobuf and numpy: grpcio, pillow, werkzeug and the
data server are the TensorBoard server's) and galore-torch (without bitsandbytes: its 8-bit optimizer is
not used, training/gpu_check/env.py). Each comes with its dependency closure, at the versions installed in
this repository's venv (the tested ones), as cp312 manylinux or pure-Python wheels. Never torch.
Not carried: datasets (streaming C4 from the Hub, which the machine cannot reach) and the built-in
corpus (the check trains on a synthetic one).

.whl/requirements.txt is installed with dependency resolution (what is already there and fits is kept;
numpy and packaging at any version), .whl/requirements-nodeps.txt without it. The folder is written
in .cache/ and renamed into place; an existing .whl/ is replaced only when this script made it (it holds
MANIFEST.txt).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / ".whl"
LIMIT = 64 * 2**20
ROOTS = ("deepspeed", "numpy", "safetensors", "tqdm", "transformers", "tensorboard", "galore-torch")
# Packages installed without their declared dependencies, and the ones of those they need here.
NO_DEPS = {"tensorboard": ("absl-py", "protobuf", "numpy", "packaging"), "galore-torch": ("transformers",)}
ON_MACHINE = {"torch", "triton", "sentencepiece"}
# Named without a version in requirements.txt: a copy the machine may already have (with torch) is kept.
KEEP_INSTALLED = {"numpy", "packaging"}
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none", *[a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                                           "any") for a in ("--platform", p)]]
MARKERS = {"extra": "", "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}


def requirements(name: str) -> list[str]:
    """The installed distribution's dependencies on Python 3.12 / Linux (no extras), NO_DEPS applied."""
    if name in NO_DEPS:
        return list(NO_DEPS[name])
    out = []
    for text in md.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(MARKERS):
            out.append(canonicalize_name(req.name))
    return out


def closure() -> dict[str, str]:
    """{package: installed version} of ROOTS and everything they need, less what the machine has."""
    pins, todo = {}, list(ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pins or name in ON_MACHINE:
            continue
        try:
            pins[name] = md.version(name)
        except md.PackageNotFoundError:
            sys.exit(f"gpu_wheelhouse.py: error: {name} is not installed in this venv; run scripts/setup.sh first")
        todo += requirements(name)
    return pins


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, cwd=REPO, env=env)


def build(tmp: Path, pins: dict[str, str]) -> None:
    """DeepSpeed built here (no ops), every other pin downloaded as a py3.12 wheel."""
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", f"deepspeed=={pins['deepspeed']}", "-w", str(tmp),
        env={**os.environ, "DS_BUILD_OPS": "0"})
    rest = [f"{n}=={v}" for n, v in sorted(pins.items()) if n != "deepspeed"]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(tmp), *rest)
    resolved = [n for n in ROOTS if n not in NO_DEPS] + sorted({d for n in NO_DEPS for d in NO_DEPS[n]})
    (tmp / "requirements.txt").write_text("".join(n + ("" if n in KEEP_INSTALLED else f"=={pins[n]}") + "\n"
                                                  for n in dict.fromkeys(resolved)))
    (tmp / "requirements-nodeps.txt").write_text("".join(f"{n}=={pins[n]}\n" for n in NO_DEPS))


def main() -> int:
    if WHEELHOUSE.exists() and not (WHEELHOUSE / "MANIFEST.txt").is_file():
        sys.exit(f"gpu_wheelhouse.py: error: {WHEELHOUSE} exists and was not made by this script; move it away")
    pins = closure()
    tmp = WHEELHOUSE.parent / ".cache" / "whl.partial"     # git-ignored: a device run never carries it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp, pins)
    wheels = sorted(tmp.glob("*.whl"))
    total = sum(w.stat().st_size for w in tmp.iterdir())
    lines = [f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}" for w in wheels]
    lines.append(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels (limit {LIMIT / 2**20:.0f} MiB)")
    (tmp / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if total > LIMIT:
        shutil.rmtree(tmp)
        sys.exit(f"gpu_wheelhouse.py: error: {total / 2**20:.2f} MiB exceeds the {LIMIT / 2**20:.0f} MiB a lease "
                 f"carries")
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    tmp.rename(WHEELHOUSE)
    print(f"wrote {WHEELHOUSE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
