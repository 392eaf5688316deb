"""The study's tasks: data splits, training budget, and the test metrics of one trained model."""
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from pedro_ext import PedroModel
from pedro_ext.train import IGNORE, collate, encode

from . import data

Pairs = List[Tuple[str, str]]


@dataclass(frozen=True)
class TaskSpec:
    """What one task trains on and how long: every method gets the same budget.

    labels: for classification, the responses whose first token is scored at the end of the
        prompt (accuracy); None for generation tasks (response loss only)."""
    name: str
    steps: int
    eval_every: int
    batch_size: int
    max_length: int
    splits: Dict[str, int]  # sizes: train, dev, test (for BBC dev/test are totals, 5 classes)
    labels: Optional[Tuple[str, ...]] = None
    max_words: Optional[int] = None  # BBC: article words kept in a prompt
    data_seed: int = 0
    # another task on the same data whose sweep picks this task's configurations (no sweep of
    # its own): for a budget too long to sweep on this machine
    tuned_on: Optional[str] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["tuned_on"] is None:  # keeps the fingerprints of tasks made before the field
            del d["tuned_on"]
        return d


BBC_RESPONSES = tuple(" " + w for w in data.BBC_LABELS.values())

TASKS = {
    # 256 training articles (32 words, ~69 tokens with the instruction): 48 steps of 8 = 1.5 epochs.
    "bbc": TaskSpec("bbc", steps=48, eval_every=12, batch_size=8, max_length=128,
                    splits=dict(train=256, dev=50, test=250), labels=BBC_RESPONSES, max_words=32),
    # 256 Q/A pairs of at most 64 tokens (~30 on average): 64 steps of 8 = 2 epochs.
    "chat": TaskSpec("chat", steps=64, eval_every=16, batch_size=8, max_length=64,
                     splits=dict(train=256, dev=50, test=200)),
}
# One adapter for both tasks at once, the prompt deciding which (half the items of each; BBC's
# dev / test halves stratified, chat pairs kept to chat's 64 tokens): the setting PEDRO's
# prompt-dependent vectors are meant for, where one static scaling (PEDRO-static, IA3, LoRA) must
# serve both. 64 steps of 8 = 2 epochs. Accuracy is over the BBC items, the loss over all.
TASKS["mix"] = TaskSpec("mix", steps=64, eval_every=16, batch_size=8, max_length=128,
                        splits=dict(train=256, dev=50, test=250), labels=BBC_RESPONSES,
                        max_words=32)
# The same tasks at twice the steps (bbc 3 epochs, chat 4): does the ranking hold once training
# has converged, and does the best dev step come before the last? A task is named
# <dataset>[-<budget>]; the data and the splits are the dataset's.
# bbc-xl: four times the steps (6 epochs), evaluated as often as the long budget (8 times): on
# bbc-long PEDRO and its static control were still improving at their last step.
_SHORT = dict(TASKS)
TASKS.update({f"{name}-long": dataclasses.replace(spec, name=f"{name}-long", steps=2 * spec.steps)
              for name, spec in _SHORT.items()})
TASKS["bbc-xl"] = dataclasses.replace(_SHORT["bbc"], name="bbc-xl", steps=4 * _SHORT["bbc"].steps,
                                      eval_every=2 * _SHORT["bbc"].eval_every)
# bbc-xxl: eight times the steps (12 epochs), every method at its bbc-xl learning rate: on bbc-xl
# PEDRO's best step was its last in every run, every other method had peaked before.
TASKS["bbc-xxl"] = dataclasses.replace(_SHORT["bbc"], name="bbc-xxl", steps=8 * _SHORT["bbc"].steps,
                                       eval_every=32, tuned_on="bbc-xl")


def dataset_of(spec: TaskSpec) -> str:
    return spec.name.split("-")[0]


def quick(spec: TaskSpec) -> TaskSpec:
    """A smoke-test version of a task: 2 steps, a handful of items."""
    small = dict(train=10, dev=5, test=10) if spec.labels else dict(train=16, dev=4, test=8)
    if dataset_of(spec) == "mix":
        small = dict(train=10, dev=10, test=10)  # one BBC item per class in dev and test
    return dataclasses.replace(spec, steps=2, eval_every=1, splits=small)


def load_splits(spec: TaskSpec, tokenizer) -> Dict[str, Pairs]:
    s, dataset = spec.splits, dataset_of(spec)
    if dataset == "bbc":
        k = len(data.BBC_LABELS)
        if s["dev"] % k or s["test"] % k:
            raise ValueError(f"bbc dev/test sizes must be multiples of {k} (stratified), got {s}")
        return data.bbc_splits(s["train"], s["dev"] // k, s["test"] // k, spec.max_words,
                               seed=spec.data_seed)
    if dataset == "chat":
        return _chat_splits(s["train"], s["dev"], s["test"], spec.max_length, spec.data_seed,
                            tokenizer)
    if dataset == "mix":
        half = {k: v // 2 for k, v in s.items()}
        k = len(data.BBC_LABELS)
        if half["dev"] % k or half["test"] % k:
            raise ValueError(f"mix dev/test sizes must be twice multiples of {k}, got {s}")
        bbc = data.bbc_splits(half["train"], half["dev"] // k, half["test"] // k, spec.max_words,
                              seed=spec.data_seed)
        chat = _chat_splits(s["train"] - half["train"], s["dev"] - half["dev"],
                            s["test"] - half["test"], TASKS["chat"].max_length, spec.data_seed,
                            tokenizer)
        out = {}
        for n in s:
            pairs = bbc[n] + chat[n]
            random.Random(spec.data_seed).shuffle(pairs)
            out[n] = pairs
        return out
    raise ValueError(f"unknown task {spec.name!r}; known: {sorted(TASKS)}")


def _chat_splits(n_train, n_dev, n_test, max_length, seed, tokenizer) -> Dict[str, Pairs]:
    def fits(prompt, response):
        return len(encode(tokenizer, prompt, response, 10 ** 6)["input_ids"]) <= max_length
    return data.chat_splits(n_train, n_dev, n_test, seed=seed, keep=fits)


def label_token_ids(tokenizer, labels) -> List[int]:
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the labels {labels} must differ in their first token")
    return ids


@torch.no_grad()
def score_test_split(model, tokenizer, pairs: Pairs, spec: TaskSpec, batch_size: int = 8) -> dict:
    """Response loss (mean cross-entropy over every response token, EOS included) and, for
    classification, accuracy over the items whose response is a label: the label whose first
    token scores highest at the prompt's end. One forward per batch gives both (causal
    attention: the prompt-end logits do not see the response; a PEDRO adapter pools the prompt
    only); logits only at the positions scored. A test split mixing labelled and other items
    (the mix task) also gets the loss of each part (test_loss_labelled, test_loss_other)."""
    label_ids = label_token_ids(tokenizer, spec.labels) if spec.labels else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode(tokenizer, p, r, spec.max_length) for p, r in pairs]
    labelled = [bool(spec.labels) and r in spec.labels for _, r in pairs]
    is_pedro = isinstance(model, PedroModel)
    model.eval()
    loss_sum, tokens, correct = [0.0, 0.0], [0, 0], 0  # [other, labelled]
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        kind = torch.tensor(labelled[i:i + batch_size])
        b = collate(chunk, pad)
        target = b["labels"][:, 1:]
        scored = target != IGNORE  # position t predicts token t + 1
        keep = torch.nonzero(scored.any(0)).flatten()
        extra = {"prompt_lengths": b["prompt_lengths"]} if is_pedro else {}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       logits_to_keep=keep, **extra).logits.float()  # [B, len(keep), V]
        tgt = target[:, keep]
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")  # [B, keep]
        for part in (0, 1):
            rows = kind == bool(part)
            loss_sum[part] += per_token[rows].sum().item()
            tokens[part] += int((tgt[rows] != IGNORE).sum())
        if label_ids is not None and kind.any():
            first = torch.searchsorted(keep, b["prompt_lengths"] - 1)  # the prompt's last token
            scores = logits[torch.arange(len(chunk)), first][:, label_ids]
            gold = torch.tensor([label_ids.index(e["input_ids"][e["prompt_lengths"]]) if k else -1
                                 for e, k in zip(chunk, labelled[i:i + batch_size])])
            correct += int(((scores.argmax(-1) == gold) & kind).sum())
    out = {"test_loss": sum(loss_sum) / max(sum(tokens), 1)}
    out["test_ppl"] = math.exp(out["test_loss"])
    if label_ids is not None:
        out["test_accuracy"] = correct / max(sum(labelled), 1)
        if not all(labelled):
            out["test_loss_labelled"] = loss_sum[1] / max(tokens[1], 1)
            out["test_loss_other"] = loss_sum[0] / max(tokens[0], 1)
    return out
