"""scripts/gpu_wheelhouse.py: what goes into the GPU machine's wheelhouse (no download here: the closure
and the install lists; the download itself is measured in docs/BENCHMARKS.md, "The GPU check")."""
import pytest

import gpu_wheelhouse as wh


def test_closure_holds_what_train_c4_imports_and_never_torch():
    pins = wh.closure()
    for name in ("deepspeed", "numpy", "safetensors", "tqdm", "transformers", "tensorboard", "galore-torch",
                 "pydantic", "hjson", "absl-py", "protobuf", "tokenizers", "huggingface-hub"):
        assert name in pins, name
    for name in ("torch", "triton", "sentencepiece", "bitsandbytes", "grpcio", "pillow", "tensorboard-data-server",
                 "datasets", "nvidia-cublas-cu12"):
        assert name not in pins, name
    assert all(v and v[0].isdigit() for v in pins.values())


def test_no_deps_packages_name_only_what_they_need(tmp_path, monkeypatch):
    assert wh.requirements("tensorboard") == ["absl-py", "protobuf", "numpy", "packaging"]
    assert wh.requirements("galore-torch") == ["transformers"]
    assert "torch" in wh.requirements("deepspeed")          # dropped later: the machine has it
    written = []
    monkeypatch.setattr(wh, "pip", lambda *args, env=None: written.append((args, env)))
    wh.build(tmp_path, wh.closure())
    (wheel_args, env), (download_args, _) = written
    assert wheel_args[0] == "wheel" and "--no-build-isolation" in wheel_args and env["DS_BUILD_OPS"] == "0"
    assert "--python-version" in download_args and "--only-binary=:all:" in download_args
    assert not any(a.startswith(("torch==", "deepspeed==")) for a in download_args)
    req = (tmp_path / "requirements.txt").read_text().split()
    assert req[0].startswith("deepspeed==") and "numpy" in req and "tensorboard==" not in " ".join(req)
    assert [r.split("==")[0] for r in (tmp_path / "requirements-nodeps.txt").read_text().split()] == \
        ["tensorboard", "galore-torch"]


def test_a_foreign_wheelhouse_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "mine.whl").write_text("")
    monkeypatch.setattr(wh, "WHEELHOUSE", tmp_path / ".whl")
    with pytest.raises(SystemExit, match="exists and was not made by this script; move it away"):
        wh.main()
    assert (tmp_path / ".whl" / "mine.whl").is_file()


def test_a_wheelhouse_over_the_limit_is_not_kept(tmp_path, monkeypatch):
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "MANIFEST.txt").write_text("an earlier one\n")
    monkeypatch.setattr(wh, "WHEELHOUSE", tmp_path / ".whl")
    monkeypatch.setattr(wh, "LIMIT", 10)
    monkeypatch.setattr(wh, "build", lambda tmp, pins: (tmp / "big-1.0-py3-none-any.whl").write_bytes(b"x" * 11))
    with pytest.raises(SystemExit, match="MiB exceeds the 0 MiB a lease carries"):
        wh.main()
    assert (tmp_path / ".whl" / "MANIFEST.txt").read_text() == "an earlier one\n"
    assert not (tmp_path / ".cache" / "whl.partial").exists()
