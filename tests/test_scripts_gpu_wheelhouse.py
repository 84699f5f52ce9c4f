"""scripts/gpu_wheelhouse.py: what goes into the GPU machine's wheelhouse (no download here: the closure
and the install lists; the download itself is measured in docs/BENCHMARKS.md, "The GPU check")."""
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
