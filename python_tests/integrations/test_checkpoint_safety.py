"""Saves that never destroy the previous checkpoint or a user's files, and loads that check
everything before they touch a model (save_trained / load_trained / load_weights_into).

Each test names the finding of the issue it pins down ("Nothing lost when a run is cut short
or a folder is damaged"). Tiny random models (the ``tiny-bert`` preset) with real peft
adapters.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from zofo_kernels.apps import models
from zofo_kernels.integrations import checkpoint as ckpt
from zofo_kernels.integrations import durable


def _peft_model(seed=0):
    model = models.add_peft(models.build_random("tiny-bert"), "lora")
    model.add_adapter("lower", model.peft_config["default"])
    model.set_adapter("default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _save(folder, model, **kw):
    return ckpt.save_trained(folder, model, method="bilevel-zofo", lower_adapter="lower",
                             optimizer_state={"x": torch.ones(2)}, run_state={"a": 1}, **kw)


def _unseal(folder):
    """A folder as earlier versions wrote it (format 1, no completion record): the tensor
    checks alone stand between a damaged file and the model."""
    os.remove(folder / durable.COMPLETE)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["version"] = 1
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _edit_backbone(folder, edit):
    path = folder / "model" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def saved(tmp_path):
    model = _peft_model()
    _save(tmp_path / "ckpt", model)
    return tmp_path / "ckpt", model


def test_finding2_a_failed_save_leaves_the_previous_checkpoint_whole(saved, monkeypatch):
    folder, model = saved
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    newer = _peft_model(seed=1)
    for point in ("save:backbone", "save:adapters", "save:resume", "durable:written"):
        monkeypatch.setenv(durable.CRASH_ENV, f"{point}#1=enospc")
        durable.crash_counts.clear()
        with pytest.raises(OSError, match="No space left"):
            _save(folder, newer)
        after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert after == before, point
        assert [p.name for p in folder.parent.iterdir()] == ["ckpt"], point
    monkeypatch.delenv(durable.CRASH_ENV)
    target = _peft_model(seed=2)
    ckpt.load_weights_into(target, folder)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_finding3_a_mixed_folder_is_refused_and_the_model_untouched(saved, tmp_path):
    folder, _ = saved
    other = tmp_path / "other"
    _save(other, _peft_model(seed=5))
    # the backbone of another save beside this folder's adapters (a half-written save of old)
    (folder / "model" / "model.safetensors").write_bytes(
        (other / "model" / "model.safetensors").read_bytes())
    target = _peft_model(seed=3)
    before = _snapshot(target)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors does not match its sha256"):
        ckpt.load_weights_into(target, folder)
    _assert_unchanged(target, before)
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_trained(folder)


def test_finding3_a_folder_without_its_completion_record_is_incomplete(saved):
    folder, _ = saved
    os.remove(folder / durable.COMPLETE)   # the record is written last: the save was cut short
    with pytest.raises(ckpt.CheckpointError, match="not completely written"):
        ckpt.load_trained(folder)


def test_finding4_a_missing_weight_is_an_error_not_a_random_value(tmp_path):
    model = models.build_random("tiny-bert")
    folder = tmp_path / "plain"
    ckpt.save_trained(folder, model)
    _unseal(folder)
    name = "classifier.weight"
    _edit_backbone(folder, lambda t: t.pop(name))
    with pytest.raises(ckpt.CheckpointError, match=f"missing.*{name}"):
        ckpt.load_trained(folder)
    target = models.build_random("tiny-bert")
    before = _snapshot(target)
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.load_weights_into(target, folder)
    _assert_unchanged(target, before)


def test_finding5_a_wrong_shaped_tensor_is_refused_not_broadcast(saved):
    folder, _ = saved
    _unseal(folder)
    key = "bert.embeddings.LayerNorm.weight"
    _edit_backbone(folder, lambda t: t.__setitem__(key, torch.full((1,), 0.5)))
    target = _peft_model(seed=3)
    before = _snapshot(target)
    with pytest.raises(ckpt.CheckpointError, match=f"{key} is torch.float32 \\[1\\]"):
        ckpt.load_weights_into(target, folder)
    _assert_unchanged(target, before)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_trained(folder)


def test_finding5_a_wrong_dtype_is_refused(saved):
    folder, _ = saved
    _unseal(folder)
    key = "bert.pooler.dense.bias"
    _edit_backbone(folder, lambda t: t.__setitem__(key, t[key].double()))
    target = _peft_model(seed=3)
    before = _snapshot(target)
    with pytest.raises(ckpt.CheckpointError, match="float64"):
        ckpt.load_weights_into(target, folder)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("damage", ["missing adapter tensor", "wrong-shaped lower tensor"])
def test_finding6_nothing_is_copied_before_every_tensor_is_checked(saved, damage):
    folder, _ = saved
    _unseal(folder)
    sub = folder / ("adapter" if damage.startswith("missing") else "resume/lower_adapter")
    path = sub / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[-1]
    if damage.startswith("missing"):
        tensors.pop(key)
    else:
        tensors[key] = torch.zeros(3)
    save_file(tensors, str(path))
    target = _peft_model(seed=3)
    before = _snapshot(target)
    with pytest.raises(ckpt.CheckpointError, match="adapter"):
        ckpt.load_weights_into(target, folder)
    _assert_unchanged(target, before)


def test_finding7_a_save_never_deletes_files_it_did_not_write(tmp_path):
    model = _peft_model()
    folder = tmp_path / "out"
    for rel in ("model/important_weights.bin", "adapter/my_adapter.txt"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("mine")
    (folder / "notes.txt").write_text("mine too")
    with pytest.raises(ckpt.CheckpointError, match="important_weights.bin.*overwrite=True"):
        _save(folder, model)
    assert (folder / "model/important_weights.bin").read_text() == "mine"
    (folder / "model/important_weights.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match="my_adapter.txt"):
        _save(folder, model)
    (folder / "adapter/my_adapter.txt").unlink()
    _save(folder, model)            # entries beside the parts are carried over, never deleted
    _save(folder, model)
    assert (folder / "notes.txt").read_text() == "mine too"
    ckpt.load_trained(folder)
    (folder / "model" / "thesis.tex").write_text("x")
    _save(folder, model, overwrite=True)       # asked for: the folder is replaced
    assert not (folder / "model" / "thesis.tex").exists()


@pytest.mark.parametrize("field", ["backbone", "adapter", "tokenizer", "run_state"])
def test_finding9_manifest_paths_must_stay_inside_the_folder(saved, tmp_path, field):
    folder, _ = saved
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest[field] = str(tmp_path / "elsewhere") if field == "tokenizer" else "../elsewhere"
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=f"{field} = .*(outside|not a path inside)"):
        ckpt.read_manifest(folder, verify=False)


def test_finding9_custom_code_is_never_run_nor_asked_about(tmp_path, monkeypatch):
    folder = tmp_path / "plain"
    ckpt.save_trained(folder, models.build_random("tiny-bert"))
    _unseal(folder)
    config = json.loads((folder / "model/config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.Evil"}
    (folder / "model/config.json").write_text(json.dumps(config))
    (folder / "model/modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["model_class"] = "Evil"   # not a transformers class: the Auto class decides
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("prompted"))
    try:
        ckpt.load_trained(folder)       # the built-in class of model_type, no custom code
    except ckpt.CheckpointError as exc:  # or a refusal naming the folder
        assert "plain" in str(exc)


def test_a_leftover_temporary_is_never_loaded_and_a_half_swap_recovers(saved):
    folder, model = saved
    tmp = folder.with_name(folder.name + durable.TMP_TAG + "999-0")
    tmp.mkdir()
    (tmp / ckpt.MANIFEST).write_text("{}")
    ckpt.load_trained(folder)
    _save(folder, model)                  # the next save removes the leftover
    assert not tmp.exists()
    os.rename(folder, folder.with_name(folder.name + durable.OLD_TAG))  # killed mid-swap
    ckpt.load_trained(folder)
    assert folder.is_dir()
