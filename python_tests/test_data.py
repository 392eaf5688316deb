"""Training data: rows and JSON-lines files -> (prompt, response) pairs, with errors that say
where the bad row is; encoded examples that transformers.Trainer keeps whole."""
import inspect
import re

import pytest

from pedro_ext import PedroModel
from pedro_ext.data import (IGNORE, check_templates, collate, encode, read_pairs, to_pair,
                            to_pairs)

from tiny_models import CharTokenizer


def _write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_pairs_reads_both_row_kinds(tmp_path):
    path = _write(tmp_path, '{"prompt": "Capital of France?", "response": " PARIS!"}\n\n'
                            '{"text": "Stocks fell.", "label": "business"}\n')
    assert read_pairs(path) == [("Capital of France?", " PARIS!"),
                                ("Stocks fell.\nLabel:", " business")]
    assert read_pairs(path, "Text: {text}\nTopic:", " <{label}>")[1] == \
        ("Text: Stocks fell.\nTopic:", " <business>")


def test_read_pairs_skips_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"prompt": "a", "response": "b"}\n'.encode("utf-8-sig"))
    assert read_pairs(str(path)) == [("a", "b")]


@pytest.mark.parametrize("lines, line, message", [
    (['{"prompt": "a", "response": "b"}'] * 4 + ['{"prompt": "a", "response": "b",}'], 5,
     "not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": null, "response": "b"}'], 2,
     "'prompt' must be a string, got None"),
    (['{"text": "a", "label": null}'], 1, "'label' must be a string or an integer"),
    (['{"prompt": "a", "response": "b"}', '["a", "b"]'], 2, "must be a JSON object"),
    (['{"question": "a", "answer": "b"}'], 1, "need keys 'prompt' and 'response', or 'text'"),
])
def test_read_pairs_names_file_and_line(tmp_path, lines, line, message):
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(message)):
        read_pairs(path)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_read_pairs_empty_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=re.escape(f"{path} has no examples")):
        read_pairs(path)


def test_to_pairs_accepts_tuples_lists_and_dicts():
    rows = [("p", "r"), ["p2", "r2"], {"prompt": "p3", "response": "r3"}, {"text": "t", "label": 2}]
    assert to_pairs(rows, "rows") == [("p", "r"), ("p2", "r2"), ("p3", "r3"), ("t\nLabel:", " 2")]
    with pytest.raises(ValueError, match=re.escape("rows[1]: expected a (prompt, response) pair")):
        to_pairs([("p", "r"), ("only one",)], "rows")
    with pytest.raises(ValueError, match=re.escape("rows[0]: 'response' must be a string, got 3")):
        to_pairs([("p", 3)], "rows")
    with pytest.raises(ValueError, match="rows must be a sequence of rows"):
        to_pairs("prompt", "rows")
    with pytest.raises(ValueError, match=re.escape("x: 'text' must be a string")):
        to_pair({"text": 1, "label": "a"}, "x")


@pytest.mark.parametrize("prompt, response, message", [
    ("no field", " {label}", "label_prompt_template must contain {text}"),
    ("{text} {other}", " {label}", "label_prompt_template must be a format string"),
    ("{text}", " {label", "label_response_template must be a format string"),
])
def test_bad_templates(prompt, response, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_templates(prompt, response)


def test_encoded_examples_are_forward_arguments_and_collate():
    """Trainer drops columns that are not forward's arguments (remove_unused_columns); every
    key of an encoded example is one, so collate still gets the prompt lengths."""
    tok = CharTokenizer()
    examples = [encode(tok, "apple 12 is", " aaa", 64), encode(tok, "fig is", " fff", 64)]
    forward_args = set(inspect.signature(PedroModel.forward).parameters)
    assert set(examples[0]) <= forward_args
    batch = collate(examples, tok.pad_token_id)
    assert batch["prompt_lengths"].tolist() == [11, 6]
    assert batch["input_ids"].shape == (2, 11 + 5)  # response + EOS
    assert batch["labels"][1].tolist() == [IGNORE] * 6 + examples[1]["labels"][6:] + [IGNORE] * 5
    assert batch["attention_mask"].sum(1).tolist() == [16, 11]
    # without prompt lengths (a user's own columns) the batch simply has none
    bare = collate([{k: e[k] for k in ("input_ids", "labels")} for e in examples], 0)
    assert "prompt_lengths" not in bare


def test_encode_cuts_the_prompt_not_the_response():
    tok = CharTokenizer()
    e = encode(tok, "a long prompt here", " resp", 10)
    assert len(e["input_ids"]) == 10 and e["prompt_lengths"] == 10 - 6
    assert e["labels"][-6:] == e["input_ids"][-6:]
