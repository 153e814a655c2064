"""Every code block of README.md, docs/*.md, docs/optimizers/*.md and benchmarks/README.md
runs (or, where marked ``# not run by python_tests/docs (why)``, is checked): see
docblocks.py for what "runs" and "checked" mean for each kind of block."""

import re
import shlex

import pytest

from docblocks import (NOT_RUN, PAGES, REPO, RUN_LANGUAGES, TEXT_LANGUAGES, PageRun,
                       _split_commands, fences)


def test_the_pages_are_found_and_every_fence_has_a_known_language():
    assert "README.md" in PAGES and "docs/cli.md" in PAGES and "benchmarks/README.md" in PAGES
    for page in PAGES:
        for line, lang, _ in fences((REPO / page).read_text()):
            assert lang in RUN_LANGUAGES + TEXT_LANGUAGES, (
                f"{page}:{line}: a ```{lang} block: the docs test runs python and bash blocks "
                "and leaves text ones; use one of those or teach python_tests/docs")


def _code_blocks(page):
    return [b for b in fences((REPO / page).read_text()) if b[1] in RUN_LANGUAGES]


@pytest.mark.parametrize("page", [p for p in PAGES if _code_blocks(p)])
def test_every_block_of_the_page_runs(page, doc_workdir):
    blocks = _code_blocks(page)
    log = PageRun(page, doc_workdir).run()
    # every block was evaluated (a block that the parser missed would be silently untested)
    assert sorted({int(re.match(r"line (\d+)", e).group(1)) for e in log}) == \
        sorted(line for line, _, _ in blocks), log


def test_blocks_marked_not_run_say_why():
    for page in PAGES:
        for line, lang, body in fences((REPO / page).read_text()):
            first = body.strip().split("\n", 1)[0]
            m = NOT_RUN.match(first)
            if lang in RUN_LANGUAGES and m:
                assert re.match(r"\(.+\)", m["reason"]), f"{page}:{line}: give the reason"


def _setup_block():
    """The README's two set-up commands (the block under "Set-up: two commands")."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Set-up: two commands"):]
    line, lang, body = fences(section)[0]
    assert lang == "bash" and len(_split_commands(body)) == 6, body
    return body


OUTPUT_ONLY = re.compile(r"^(-q|-ra|--durations=\d+)$")


def test_the_readme_set_up_commands_are_the_ones_ci_runs():
    """README's install + test command is .ci/run's (up to pytest's output options -q, -ra,
    --durations, which change what is printed, not what runs)."""
    body = _setup_block()
    ci = (REPO / ".ci" / "run").read_text()
    # the main job: installs, then zofo-bench --quick
    assert "pip install torch==2.13.0 && pip install -e \".[apps]\" && zofo-bench --quick" in body
    # the tests: .ci/run's install line and its pytest line
    install = re.search(r"^\s*(pip install torch==[\d.]+ && pip install -e \"\.\[test\]\")\s*$",
                        ci, re.M)
    assert install, "the install line of .ci/run's tests stage moved"
    assert install.group(1) in body
    ci_pytest = re.search(r"^\s*(TRITON_INTERPRET=1 python -m pytest python_tests[^\n]*)$", ci,
                          re.M)
    assert ci_pytest, "the pytest line of .ci/run's tests stage moved"
    ci_words = [w for w in shlex.split(ci_pytest.group(1)) if not OUTPUT_ONLY.match(w)]
    readme = re.search(r"(TRITON_INTERPRET=1 python -m pytest python_tests[^\n]*)", body)
    readme_words = [w for w in shlex.split(readme.group(1), comments=True)
                    if not OUTPUT_ONLY.match(w)]
    assert readme_words == ci_words


BROKEN = {
    "a name nobody defines": ("```python\nx = 1\nloss(x)\n```\n", NameError, "loss"),
    "a placeholder for a value": (
        "```python\nloss_plus = ...\ng = (loss_plus - 1.0) / 2e-3\n```\n", TypeError, "ellipsis"),
    "zofo-train without a run length": (
        "```bash\nzofo-train --model tiny-bert --method mezo --train "
        "../shared/data/sst2/train.tsv --eval ../shared/data/sst2/dev.tsv --output runs/x\n```\n",
        AssertionError, "give --steps"),
    "torchrun without --eval": (
        "```bash\n# not run by python_tests/docs (two processes)\n"
        "torchrun --standalone --nproc_per_node=2 -m zofo_kernels.apps.train "
        "--method mezo --train ../shared/data/sst2/train.tsv --steps 2 --output runs/x\n```\n",
        AssertionError, "give --eval"),
    "torchrun, unmarked": (
        "```bash\ntorchrun --standalone --nproc_per_node=2 my_script.py\n```\n", AssertionError,
        "mark the block"),
    "an extra pyproject.toml lacks": ("```bash\npip install -e \".[nosuch]\"\n```\n",
                                      AssertionError, "no extra 'nosuch'"),
    "a command the test does not know": ("```bash\nmake all\n```\n", AssertionError,
                                         "does not know"),
    "a script that is not there": ("```bash\npython benchmarks/nosuch.py\n```\n",
                                   AssertionError, "no such file"),
    "a GPU command, unmarked": ("```bash\nzofo-bench --device cuda --model opt-1.3b\n```\n",
                                AssertionError, "mark the block"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_block_fails(what, doc_workdir):
    """The machinery is not vacuous: blocks broken as the docs' blocks once were fail."""
    text, error, message = BROKEN[what]
    page = doc_workdir / "page.md"
    page.write_text("# a page\n\n" + text)
    with pytest.raises(error, match=re.escape(message)):
        PageRun(str(page), doc_workdir).run()


def test_saving_md_shows_the_plain_recipe_that_test_plain_hf_load_runs():
    """docs/saving.md's "transformers and peft alone" block is the recipe that
    python_tests/integrations/test_plain_hf_load.py runs in a process without zofo_kernels
    (here the docs test runs it too, on a tiny zofo-train folder)."""
    import ast
    source = (REPO / "python_tests" / "integrations" / "test_plain_hf_load.py").read_text()
    plain = {}
    for node in ast.parse(source).body:   # its RECIPE* constants, evaluated alone
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.startswith("RECIPE") for t in node.targets):
            exec(compile(ast.Module([node], []), "test_plain_hf_load.py", "exec"), plain)
    assert "RECIPE" in plain, "test_plain_hf_load.py no longer has RECIPE: update this test"
    bodies = [body for _, lang, body in fences((REPO / "docs" / "saving.md").read_text())
              if lang == "python"]
    assert plain["RECIPE"].strip() in [b.strip() for b in bodies], \
        "docs/saving.md's plain recipe differs from test_plain_hf_load.RECIPE"
