"""training.hf (export and load): transformers reads our export with our logits; DeepSpeed
checkpoints of ZeRO 0/2/3 consolidate on CPU to the trained weights; bad input gives one-line errors."""
import json
import os
import shutil

import pytest
import torch

from ckpt_helpers import deepspeed_checkpoints, exported_run
from model import LlamaForCausalLM
from common.errors import CheckpointError
from training.hf import save_final
from training.state import write_manifest
from training.hf import load_model, resolve_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return exported_run(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def ds_runs(setup):
    return deepspeed_checkpoints(setup["rc_file"], setup["tok"], setup["dir"] / "ds")


def ids(vocab=128):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def test_export_layout_is_a_plain_llama(setup):
    final = setup["final"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no temporary directory left
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "generation_config.json", "manifest.json",
                                                       "model.safetensors", "run_config.json", "tokenizer.json", "tokenizer.model",
                                                       "tokenizer_config.json"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in final.iterdir())      # group and others can read
    from safetensors.torch import load_file
    tensors = load_file(final / "model.safetensors")
    assert any(".codec." in k for k in setup["model"].state_dict())  # VeLoRA buffers exist...
    assert set(tensors) == set(LlamaForCausalLM(setup["rc"].model).state_dict())  # ...and are not exported
    assert all(t.dtype == torch.float32 for t in tensors.values())
    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}      # the tokenizer's; EOS pads
    assert json.loads((final / "config.json").read_text()) == {**setup["rc"].model.to_hf_dict(), **special}
    with open(final / "model.safetensors", "rb") as f:                          # the header's metadata
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert header["project"] == "velora-pretrain" and len(header["run_config_sha256"]) == 64
    assert (final / "tokenizer.model").read_bytes() == setup["tok"].read_bytes()


def test_transformers_loads_export_with_our_logits(setup):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(setup["final"])
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids()).logits, setup["model"].eval()(ids()), atol=1e-5, rtol=0)


def test_reexport_replaces_an_export_atomically_and_nothing_else(setup, tmp_path):
    out = tmp_path / "final"
    save_final(setup["model"], setup["rc"], setup["tok"], out)
    with pytest.raises(CheckpointError, match="holds an export; pass --overwrite"):
        save_final(setup["model"], setup["rc"], setup["tok"], out)
    save_final(setup["model"].state_dict(), setup["rc"], setup["tok"], out, dtype=torch.bfloat16, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    (out / "notes.txt").write_text("mine")          # no longer only an export: never replaced
    with pytest.raises(CheckpointError, match="is not an export written by this project"):
        save_final(setup["model"], setup["rc"], setup["tok"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_export_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    import training.hf.export as export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"writing the export .*final failed \(No space left on device\)"):
        save_final(setup["model"], setup["rc"], setup["tok"], tmp_path / "final")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_removes_the_directories_it_made_and_names_what_it_could_not(setup, tmp_path, monkeypatch):
    import training.hf.export as export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "save_file", full_disk)
    out = tmp_path / "new" / "deeper" / "final"
    with pytest.raises(CheckpointError, match=r"failed \(No space left on device\); nothing was left behind; "):
        save_final(setup["model"], setup["rc"], setup["tok"], out)
    assert list(tmp_path.iterdir()) == []                          # the parents it made are gone too
    monkeypatch.setattr(export.shutil, "rmtree", lambda *a, **k: None)   # e.g. a file it may not delete
    with pytest.raises(CheckpointError) as e:
        save_final(setup["model"], setup["rc"], setup["tok"], out)
    tmp = out.with_name(f".final.tmp{os.getpid()}")
    assert f"left behind (remove by hand): {tmp}, {out.parent.parent}, {out.parent};" in str(e.value)
    assert "nothing was left behind" not in str(e.value) and tmp.is_dir()


def test_a_failed_replace_puts_the_earlier_export_back(setup, tmp_path, monkeypatch):
    import training.hf.export as export
    out = save_final(setup["model"], setup["rc"], setup["tok"], tmp_path / "final")
    before = (out / "model.safetensors").read_bytes()
    real = os.replace

    def replace(src, dst):
        if ".tmp" in str(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(CheckpointError, match=r"failed \(Input/output error\); nothing was left behind; "):
        save_final(setup["model"], setup["rc"], setup["tok"], out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_exports_to_one_out_are_serialised_and_never_claim_anothers_result(setup, tmp_path, monkeypatch):
    import training.hf.export as export
    out = tmp_path / "final"
    with export.export_lock(out):                 # another export is writing `out` now
        with pytest.raises(CheckpointError, match=rf"^{out}: another export is writing it now \(pid {os.getpid()} "):
            save_final(setup["model"], setup["rc"], setup["tok"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    real = export.plain_state_dict

    def slow_gather(*a):                          # the other export finishes while this one gathers its weights
        real_out = real(*a)
        monkeypatch.setattr(export, "plain_state_dict", real)
        save_final(setup["model"], setup["rc"], setup["tok"], out)
        return real_out
    monkeypatch.setattr(export, "plain_state_dict", slow_gather)
    with pytest.raises(CheckpointError, match="already exists and holds an export; pass --overwrite"):
        save_final(setup["model"].state_dict(), setup["rc"], setup["tok"], out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"   # the first one's, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_load_final_and_run_dir(setup):
    for path in (setup["final"], setup["final"].parent):  # a run dir prefers final/
        model, rc, tok = load_model(path)
        assert rc.model == setup["rc"].model and not model.training
        assert tok.model_path and open(tok.model_path, "rb").read() == setup["tok"].read_bytes()
        with torch.no_grad():
            torch.testing.assert_close(model(ids()), setup["model"](ids()), atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_load_deepspeed_checkpoints(ds_runs, stage, caplog):
    run = ds_runs[stage]
    ref = torch.load(run / "ref.pt", weights_only=True)
    tag = run / "checkpoints" / "step_1"
    for path in (tag, run / "checkpoints", run):  # tag dir, checkpoints/ (latest), run dir without final/
        assert resolve_checkpoint(path).dir == tag
        model, rc, _ = load_model(path)
        sd = model.state_dict()
        for k, v in sd.items():
            torch.testing.assert_close(v, ref[k].float(), atol=0, rtol=0, msg=k)
    assert "no final/ export" in caplog.text  # says it fell back to a DeepSpeed directory


# ---- bad input: one line naming the file -------------------------------------------------------------

def test_load_zero0_checkpoint_with_galore_optimizer_state(setup, tmp_path):
    """ZeRO 0 keeps the optimizer state beside the weights; GaLore's holds pickled projector objects,
    which must not stop a weights-only load (and must not import or run galore_torch)."""
    galore = pytest.importorskip("galore_torch.galore_projector")
    tag = tmp_path / "checkpoints" / "step_1"
    tag.mkdir(parents=True)
    weights = {k: v for k, v in setup["model"].state_dict().items() if ".codec." not in k}
    projector = galore.GaLoreProjector(rank=4)
    projector.ortho_matrix = torch.randn(8, 4)
    torch.save({"module": weights, "optimizer": {"state": {0: {"projector": projector}}}},
               tag / "mp_rank_00_model_states.pt")
    setup["rc"].save(tag / "run_config.json")
    shutil.copyfile(setup["tok"], tag / "tokenizer.model")
    model, _, _ = load_model(tag)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()), setup["model"](ids()), atol=0, rtol=0)


def one_line(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for f in fragments:
        assert str(f) in msg, (f, msg)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    one_line(e, tmp_path, "not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "missing")
    one_line(e, tmp_path / "missing", "no such directory")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "model.safetensors")
    one_line(e, tmp_path / "model.safetensors", "is a file")


def copy_final(setup, tmp_path):
    return shutil.copytree(setup["final"], tmp_path / "final")


def test_truncated_safetensors(setup, tmp_path):
    final = copy_final(setup, tmp_path)
    f = final / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        load_model(final)
    one_line(e, f, "truncated")


def test_config_weights_mismatch(setup, tmp_path):
    final = copy_final(setup, tmp_path)
    raw = json.loads((final / "run_config.json").read_text())

    def refused(model_changes: dict, *expected: str) -> None:
        raw["model"].update(model_changes)
        (final / "run_config.json").write_text(json.dumps(raw))
        write_manifest(final)    # files the manifest accepts that do not fit together: the load checks catch it
        with pytest.raises(CheckpointError) as e:
            load_model(final)
        one_line(e, final / "model.safetensors", *expected)

    refused({"intermediate_size": 96}, "shape mismatch", "mlp.gate_proj.weight")
    refused({"intermediate_size": 64, "num_hidden_layers": 3}, "missing tensor", "model.layers.2.")


def test_unexpected_tensor(setup, tmp_path):
    from safetensors.torch import load_file, save_file
    final = copy_final(setup, tmp_path)
    tensors = load_file(final / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, final / "model.safetensors")
    write_manifest(final)
    with pytest.raises(CheckpointError) as e:
        load_model(final)
    one_line(e, final / "model.safetensors", "unexpected tensor", "model.extra.weight")


def test_missing_companion_files(setup, tmp_path):
    final = copy_final(setup, tmp_path)
    (final / "tokenizer.model").unlink()
    write_manifest(final)
    with pytest.raises(CheckpointError) as e:
        load_model(final)
    one_line(e, final / "tokenizer.model", "not found")
    (final / "run_config.json").unlink()
    write_manifest(final)
    with pytest.raises(CheckpointError) as e:
        load_model(final)
    one_line(e, final / "run_config.json", "not found")


@pytest.mark.slow
@pytest.mark.parametrize("stage,name", [(0, "mp_rank_00_model_states.pt"),
                                        (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_truncated_deepspeed_file(ds_runs, tmp_path, stage, name):
    run = shutil.copytree(ds_runs[stage], tmp_path / "run")
    f = run / "checkpoints" / "step_1" / name
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError) as e:
        load_model(run / "checkpoints" / "step_1")
    one_line(e, f, "truncated")


@pytest.mark.slow
def test_latest_names_a_missing_tag(ds_runs, tmp_path):
    run = shutil.copytree(ds_runs[0], tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("step_9")
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    one_line(e, run / "checkpoints" / "latest", "step_9")


def test_transformers_clients_use_the_export_as_is(setup, tmp_path):
    """AutoTokenizer + AutoModelForCausalLM, no conversion step: the perplexity of a held-out document equals
    scripts/eval_ppl.py's evaluation (to 1e-4), a padded batch of two prompts works, generate runs."""
    transformers = pytest.importorskip("transformers")
    from data import validation_batches
    from data.builtin import write_shard
    from training.evaluate import evaluate
    final = setup["final"]
    text = "the river city stone green light paper north small large"
    tok = transformers.AutoTokenizer.from_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id                                # training put BOS before documents
    ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], 1)      # ... and EOS after them
    with torch.no_grad():
        hf_loss = float(hf(ids, labels=ids).loss)
    data = tmp_path / "c4"
    data.mkdir()
    write_shard(data / "c4-validation.00000-of-00001.json.gz", [{"text": text}])
    model, rc, our_tok = load_model(final)
    import dataclasses
    cfg = dataclasses.replace(rc.data, source="local", path=str(data))
    ours = evaluate(model, validation_batches(cfg, our_tok, 1))["loss"]
    assert abs(hf_loss - ours) < 1e-4
    batch = tok(["the river", "a small large north city"], return_tensors="pt", padding=True)
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 2   # really padded
    out = hf.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)

