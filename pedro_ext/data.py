"""Training data for pedro_ext.train: rows -> (prompt, response) pairs, JSON-lines files,
tokenisation and padding.

A row is a (prompt, response) pair, or a dict with "prompt" and "response", or a dict with
"text" and "label" (a classification example), which becomes
    prompt   = label_prompt_template.format(text=text)      default "{text}\\nLabel:"
    response = label_response_template.format(label=label)  default " {label}"
Every error names where the row came from: "file.jsonl:5" or "train_pairs[4]".
"""
import json
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

IGNORE = -100
LABEL_PROMPT_TEMPLATE = "{text}\nLabel:"
LABEL_RESPONSE_TEMPLATE = " {label}"


def check_templates(prompt_template: str, response_template: str) -> None:
    for name, template, field in (("label_prompt_template", prompt_template, "text"),
                                  ("label_response_template", response_template, "label")):
        try:
            template.format(**{field: "x"})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{name} must be a format string with only {{{field}}} in it, got "
                             f"{template!r} ({exc!r})") from None
        if "{" + field + "}" not in template:
            raise ValueError(f"{name} must contain {{{field}}}, got {template!r}")


def _string(value, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def to_pair(row, where: str, prompt_template: str = LABEL_PROMPT_TEMPLATE,
            response_template: str = LABEL_RESPONSE_TEMPLATE) -> Tuple[str, str]:
    """One row (see the module docstring) as a (prompt, response) pair."""
    prompt, response = _row_pair(row, where, prompt_template, response_template)
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty; PEDRO pools each prompt's hidden "
                         "states, so a prompt needs at least one token")
    return prompt, response


def _row_pair(row, where, prompt_template, response_template) -> Tuple[str, str]:
    if isinstance(row, dict):
        if "prompt" in row and "response" in row:
            return _string(row["prompt"], "prompt", where), _string(row["response"], "response", where)
        if "text" in row and "label" in row:
            text = _string(row["text"], "text", where)
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f"{where}: 'label' must be a string or an integer, got {label!r}")
            return (prompt_template.format(text=text), response_template.format(label=label))
        raise ValueError(f"{where}: need keys 'prompt' and 'response', or 'text' and 'label'; "
                         f"got {sorted(row)}")
    if isinstance(row, (tuple, list)) and len(row) == 2:
        return _string(row[0], "prompt", where), _string(row[1], "response", where)
    raise ValueError(f"{where}: expected a (prompt, response) pair or a dict with 'prompt' and "
                     f"'response' (or 'text' and 'label'), got {type(row).__name__} {row!r:.80}")


def to_pairs(rows: Iterable, source: str, prompt_template: str = LABEL_PROMPT_TEMPLATE,
             response_template: str = LABEL_RESPONSE_TEMPLATE) -> List[Tuple[str, str]]:
    """Every row of `rows` as a (prompt, response) pair; errors say `source[i]`."""
    if isinstance(rows, (str, bytes, dict)):
        raise ValueError(f"{source} must be a sequence of rows, got {type(rows).__name__}")
    return [to_pair(row, f"{source}[{i}]", prompt_template, response_template)
            for i, row in enumerate(rows)]


def read_pairs(path: str, prompt_template: str = LABEL_PROMPT_TEMPLATE,
               response_template: str = LABEL_RESPONSE_TEMPLATE) -> List[Tuple[str, str]]:
    """(prompt, response) pairs from a JSON-lines file (one row object per line; blank lines
    are skipped); errors say `path:line`."""
    pairs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:  # (a BOM, as Windows editors write, is not data)
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                                 f"position {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON: {exc.msg} (column {exc.colno})") \
                    from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got "
                                 f"{type(row).__name__}")
            pairs.append(to_pair(row, f"{path}:{n}", prompt_template, response_template))
    if not pairs:
        raise ValueError(f"{path} has no examples (expected one JSON object per line)")
    return pairs


def encode(tokenizer, prompt: str, response: str, max_length: int) -> Dict[str, list]:
    """Token ids of prompt + response (+ EOS); labels only on the response; the prompt is cut
    from the end when the pair is too long, the response is kept whole. The keys are the
    PedroModel.forward arguments they feed, so transformers.Trainer keeps them."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    r = tokenizer(response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    if not p:
        raise ValueError(f"the prompt {prompt[:40]!r} tokenises to no tokens; PEDRO pools each "
                         "prompt's hidden states, so a prompt needs at least one token")
    p = p[: max(1, max_length - len(r))]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt_lengths": len(p)}


def collate(examples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded batch of encoded examples (with transformers.Trainer:
    data_collator=functools.partial(collate, pad_id=tokenizer.pad_token_id))."""
    t = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if all("prompt_lengths" in e for e in examples):
        batch["prompt_lengths"] = torch.tensor([int(e["prompt_lengths"]) for e in examples])
    return batch
