"""The README's vLLM snippet (the ```py block under "Serving with vLLM") runs as written, on the
tiny test model and bank: only its first assignment and the engine size are swapped."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_LINE = 'model, adapters, tenant = "/models/smollm2-135m-instruct", "/adapters", "tenant_a"'


def _snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Serving with vLLM"):]
    (snippet,) = re.findall(r"```py\n(.*?)```", section, re.S)[:1]
    return snippet


def test_readme_vllm_snippet_runs(tiny_llama, bank, capsys):
    snippet = _snippet()
    assert FIRST_LINE in snippet and "max_num_seqs=64" in snippet
    snippet = snippet.replace(FIRST_LINE, f"model, adapters, tenant = {tiny_llama!r}, "
                              f"{os.path.dirname(bank['mean8'])!r}, 'mean8'")
    snippet = snippet.replace("max_num_seqs=64", "max_num_seqs=4, enforce_eager=True, "
                              "max_model_len=256, distributed_executor_backend='uni'")
    scope = {"__name__": "__readme__"}
    try:
        exec(compile(snippet, "README vLLM snippet", "exec"), scope)
        assert [0 < len(o.outputs[0].token_ids) <= 16 for o in scope["outs"]] == [True, True]
    finally:
        if "llm" in scope:
            from test_engine import close
            close(scope.pop("llm"))
