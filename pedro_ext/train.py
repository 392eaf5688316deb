"""Fine-tune one PEDRO adapter: `pedro_ext.train.train(...)` or `python -m pedro_ext.train`.

Data: (prompt, response) pairs, or rows as the JSON-lines files have them (pedro_ext.data:
{"prompt", "response"} or {"text", "label"} turned into prompt/response with a template). The
loss covers the response tokens only; the generator pools over the prompt only. AdamW with
linear warm-up then linear decay, gradient accumulation, evaluation every K optimizer steps with
early stopping, the best adapter saved with save_pretrained, a tqdm bar and a JSON-lines
metrics log.

Parameter groups, each with its own learning rate (chosen by parameter name, so parameters the
generator gains later land in "generator"):
  "static"    b_up, the prompt-independent part of the vectors (an IA3 vector on q, v, up):
              `static_lr` (None: `lr`).
  "generator" every other adapter parameter except the rational coefficients: w_down, b_down,
              w_up, the attention-pooling query, norms of the pooled input: `lr`.
  "rational"  rat_num, rat_den: `rational_lr`, trained as `rational_mode` says:
  "bilevel" (default): DARTS-style alternation as in the PEDRO / IAPT family: every optimizer
      step updates the static and generator groups on the training split; every
      `bilevel_every` steps one extra step updates only the rational coefficients on a batch of
      the held-out split.
  "joint":  coefficients trained with the rest on the training split.
  "frozen": coefficients stay at their initialisation (the GELU fit).
Defaults (TrainConfig): lr 1e-3, static_lr 1e-2, rational_lr 1e-3, bilevel_every 4, the quality
study's choices for SmolLM2-135M (the family uses 1e-4 / 1e-6 for 7B models trained far longer;
a 135M model and a few hundred steps need more). Every group follows the same schedule by
optimizer step, the held-out rational steps included. Under torch.distributed (torchrun), wrap
nothing yourself: `train` uses DistributedDataParallel on the model's device and shards every
batch across ranks.
"""
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import (IGNORE, LABEL_PROMPT_TEMPLATE, LABEL_RESPONSE_TEMPLATE, check_templates,
                   collate, encode, to_pairs)
from .diagnostics import vector_spread
from .model import PedroModel

__all__ = ["TrainConfig", "train", "train_baseline", "evaluate", "response_loss",
           "parameter_groups", "check_output_dir", "encode", "collate"]

RATIONAL_MODES = ("bilevel", "joint", "frozen")
# Group of an adapter parameter, by the last part of its name; anything else is "generator".
STATIC_PARAMETERS = re.compile(r"(^|\.)b_up$")
RATIONAL_PARAMETERS = re.compile(r"(^|\.)rat_(num|den)$")


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # examples per optimizer step (global, across ranks and accumulation)
    grad_accum: int = 1
    # Learning rates and the bi-level cadence: the best found by the quality study (bench/quality,
    # SmolLM2-135M, README "Quality"): the static part wants an IA3-sized lr, the generator less.
    lr: float = 1e-3  # the "generator" group (and everything in train_baseline)
    static_lr: Optional[float] = 1e-2  # the "static" group (b_up); None: lr
    rational_lr: float = 1e-3  # the "rational" group
    rational_mode: str = "bilevel"  # bilevel | joint | frozen
    bilevel_every: int = 4
    weight_decay: float = 0.0  # static and generator groups (never the rational coefficients)
    warmup_ratio: float = 0.1
    max_length: int = 256
    eval_every: int = 50
    # dev batches per evaluation, each batch_size // grad_accum examples (the micro-batch, which
    # bounds memory); None: the whole dev split
    eval_batches: Optional[int] = None
    patience: Optional[int] = None  # evaluations without improvement before stopping
    seed: int = 0
    output_dir: Optional[str] = None
    overwrite_output_dir: bool = False  # replace a previous run's files in output_dir
    progress: bool = True
    label_prompt_template: str = LABEL_PROMPT_TEMPLATE  # {"text", "label"} rows -> prompt
    label_response_template: str = LABEL_RESPONSE_TEMPLATE  # ... -> response

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"TrainConfig.{field} must be {expected}, got "
                             f"{getattr(self, field)!r}")

        for field in ("steps", "batch_size", "grad_accum", "bilevel_every", "eval_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(field, "a positive int")
        for field in ("eval_batches", "patience"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                bad(field, "None or a positive int")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) \
                or self.max_length < 2:
            bad("max_length", "an int >= 2")
        for field in ("lr", "rational_lr", "weight_decay") + (
                ("static_lr",) if self.static_lr is not None else ()):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                bad(field, "a finite number >= 0")
        if isinstance(self.warmup_ratio, bool) or not isinstance(self.warmup_ratio, (int, float)) \
                or not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", "a number in [0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2 ** 63:
            bad("seed", "an int in [0, 2**63)")
        for field in ("overwrite_output_dir", "progress"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "True or False")
        if self.rational_mode not in RATIONAL_MODES:
            bad("rational_mode", f"one of {RATIONAL_MODES}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be a multiple of "
                             f"TrainConfig.grad_accum ({self.grad_accum})")
        check_templates(self.label_prompt_template, self.label_response_template)

    def group_lr(self, group: str) -> float:
        return {"static": self.lr if self.static_lr is None else self.static_lr,
                "generator": self.lr, "rational": self.rational_lr}[group]


RUN_FILES = ("metrics.jsonl", "best", "final")  # what a run writes into output_dir


def check_output_dir(cfg: TrainConfig) -> None:
    """A ValueError, before anything is loaded or trained, if cfg.output_dir cannot take this
    run: it is not a folder, or it holds another run's files (unless overwrite_output_dir)."""
    out = cfg.output_dir
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output_dir {out!r} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"output_dir {out!r} cannot be made: {parent!r} is not a folder")
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if previous and not cfg.overwrite_output_dir:
        raise ValueError(f"output_dir {out!r} holds another run's files ({', '.join(previous)}); "
                         "choose another folder or pass overwrite_output_dir=True "
                         "(--overwrite-output-dir), which replaces them")


def _is_pedro(model) -> bool:
    return isinstance(getattr(model, "module", model), PedroModel)


def response_loss(model, batch: Dict[str, torch.Tensor], normalizer: Optional[float] = None):
    """Sum of the response tokens' cross-entropy divided by `normalizer` (default: their count).
    A PedroModel pools over the prompt only; other models (peft baselines) get the same loss."""
    extra = {}
    if _is_pedro(model) and "prompt_lengths" in batch:
        extra["prompt_lengths"] = batch["prompt_lengths"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    loss_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=IGNORE,
                                                 reduction="sum")
    count = (target != IGNORE).sum()
    return loss_sum / (normalizer if normalizer is not None else count.clamp(min=1)), count


def _batches(examples: List[dict], batch_size: int, seed: int) -> Iterator[List[dict]]:
    """Endless shuffled batches (an epoch is reshuffled with seed + epoch)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
        if len(order) < batch_size:
            yield [examples[j] for j in order]
        epoch += 1


# ----------------------------------------------------------------------------- training
def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Factor on each group's lr at optimizer step `step` (0-based): linear warm-up over
    warmup_ratio * steps steps, then linear decay; never 0 at a step that is taken."""
    warm = max(1, int(cfg.warmup_ratio * cfg.steps))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))
    return factor


def parameter_groups(pedro: PedroModel, adapter: str, cfg: TrainConfig) -> List[dict]:
    """The trainable parameters of `adapter` as optimizer groups {"name", "params", "lr",
    "weight_decay"}: "static" (b_up), "generator" (everything else but the coefficients) and,
    unless cfg.rational_mode is "frozen" or the adapter's coefficients are not trainable,
    "rational". Empty groups are left out."""
    own = {id(p) for p in pedro.adapter_parameters(adapter)}
    rational_ids = {id(p) for p in pedro.rational_parameters(adapter)}
    groups: Dict[str, list] = {"static": [], "generator": [], "rational": []}
    for name, p in pedro.named_parameters():
        if id(p) not in own:
            continue
        kind = "static" if STATIC_PARAMETERS.search(name) else \
            "rational" if RATIONAL_PARAMETERS.search(name) else "generator"
        if (kind == "rational") != (id(p) in rational_ids):
            raise RuntimeError(f"parameter {name!r}: its name and PedroModel.rational_parameters "
                               "disagree on whether it is a rational coefficient")
        groups[kind].append(p)
    if not pedro.peft_config[adapter].rational_trainable or cfg.rational_mode == "frozen":
        groups["rational"] = []
    return [{"name": kind, "params": params, "lr": cfg.group_lr(kind),
             "weight_decay": 0.0 if kind == "rational" else cfg.weight_decay}
            for kind, params in groups.items() if params]


def _step_loss(model, examples, pad_id, grad_accum, rank, world, device):
    """Forward/backward of this rank's shard of a global batch, accumulated in micro-batches;
    the loss is normalised by the global number of response tokens so that DDP's gradient
    averaging reproduces single-process training on the same global batch exactly."""
    shard = examples[rank::world]
    micro = [shard[i::grad_accum] for i in range(grad_accum)]
    batches = [{k: v.to(device) for k, v in collate(m, pad_id).items()} for m in micro if m]
    local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = torch.tensor(float(local), device=device)  # (on the device: nccl reduces no CPU tensors)
    if world > 1:
        dist.all_reduce(total)
    normalizer = max(total.item(), 1.0) / world  # DDP averages over ranks: undo it
    loss_value = 0.0
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = model.no_sync() if (world > 1 and not sync) else _null()
        with ctx:
            loss, _ = response_loss(model, b, normalizer)
            loss.backward()
        loss_value += loss.item()
    lv = torch.tensor(loss_value, device=device)
    if world > 1:
        dist.all_reduce(lv)
        lv /= world
    return lv.item()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def evaluate(model, examples: List[dict], pad_id: int, batch_size: int = 8,
             max_batches: Optional[int] = None) -> float:
    """Mean response-token cross-entropy over `examples` (any causal LM, PEDRO or not)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        if max_batches is not None and i // batch_size >= max_batches:
            break
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        loss, n = response_loss(model, b, normalizer=1.0)
        total += loss.item()
        count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def train(pedro: PedroModel, tokenizer, train_pairs: Sequence, dev_pairs: Sequence,
          cfg: TrainConfig, adapter_name: Optional[str] = None) -> dict:
    """Train `adapter_name` (default: the active adapter) of `pedro` on rows of
    pedro_ext.data's forms ((prompt, response) pairs, or dicts with prompt/response or
    text/label). Returns a summary: best_dev_loss and best_step (None without a dev split),
    steps, history (the metrics records), wall_s and adapter_dir.

    With dev pairs the adapter ends with its best (lowest dev loss) weights, saved (with
    cfg.output_dir) to output_dir/best as they are found; without, it keeps its final weights,
    saved to output_dir/final. adapter_dir is that folder (save_pretrained puts an adapter not
    named "default" in a sub-folder of its name); metrics go to output_dir/metrics.jsonl."""
    train_pairs = to_pairs(train_pairs, "train_pairs", cfg.label_prompt_template,
                           cfg.label_response_template)
    dev_pairs = to_pairs(dev_pairs or [], "dev_pairs", cfg.label_prompt_template,
                         cfg.label_response_template)
    if not train_pairs:
        raise ValueError("train_pairs is empty")
    if cfg.rational_mode == "bilevel" and not dev_pairs:
        raise ValueError("rational_mode='bilevel' needs held-out pairs (dev_pairs); pass some, "
                         "or use rational_mode='joint' or 'frozen'")
    check_output_dir(cfg)
    adapter = adapter_name or pedro.active_adapter
    pedro._require(adapter)
    if pedro.peft_config[adapter].inference_mode:
        raise ValueError(f"adapter {adapter!r} was loaded for inference (is_trainable=False); to "
                         "train it, load it with is_trainable=True")

    def save(kind: str) -> str:
        path = os.path.join(cfg.output_dir, kind)
        pedro.save_pretrained(path, selected_adapters=[adapter])
        return path if adapter == "default" else os.path.join(path, adapter)

    before = _AdapterState(pedro, adapter)
    try:
        pedro.set_adapter(adapter)
        groups = parameter_groups(pedro, adapter, cfg)
        # Coefficients that are not trained need no gradient (restored afterwards).
        rational = pedro.rational_parameters(adapter)
        saved_flags = [p.requires_grad for p in rational]
        if not any(g["name"] == "rational" for g in groups):
            for p in rational:
                p.requires_grad_(False)
        summary = _fit(pedro, tokenizer, train_pairs, dev_pairs, cfg, groups,
                       save if cfg.output_dir else None, desc=f"train {adapter}", adapter=adapter)
    except BaseException:
        before.restore()  # (files written so far stay: metrics.jsonl, best/ as it was found)
        raise
    for p, flag in zip(rational, saved_flags):
        p.requires_grad_(flag)
    return summary


class _AdapterState:
    """What train() changes in the model, to put back when it fails: the active adapter, every
    adapter parameter's requires_grad, the trained adapter's weights, the train / eval mode."""

    def __init__(self, pedro: PedroModel, adapter: str):
        self.pedro, self.active = pedro, list(pedro.active_adapters)
        self.flags = [(p, p.requires_grad) for name in pedro.peft_config
                      for p in pedro.adapter_parameters(name)]
        self.weights = [(p, p.detach().clone()) for p in pedro.adapter_parameters(adapter)]
        self.modes = [(m, m.training) for m in pedro.modules()]

    def restore(self) -> None:
        self.pedro.active_adapters = self.active
        with torch.no_grad():
            for p, w in self.weights:
                p.copy_(w)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode


def train_baseline(model, tokenizer, train_pairs, dev_pairs, cfg: TrainConfig) -> dict:
    """The same loop for any causal LM (peft LoRA / IA3 baselines): every parameter that
    requires grad is trained with cfg.lr on the training split; best dev weights restored."""
    check_output_dir(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = dataclasses.replace(cfg, rational_mode="frozen")
    groups = [{"name": "trainable", "params": params, "lr": cfg.lr,
               "weight_decay": cfg.weight_decay}]
    templates = (cfg.label_prompt_template, cfg.label_response_template)
    return _fit(model, tokenizer, to_pairs(train_pairs, "train_pairs", *templates),
                to_pairs(dev_pairs or [], "dev_pairs", *templates), cfg, groups, None,
                desc="train")


def _finite(x):
    """JSON has no Infinity / NaN: a diverged loss is logged as null."""
    return x if x is None or math.isfinite(x) else None


def _vector_spread(pedro: PedroModel, adapter: str, dev_ex: List[dict], pad_id: int, cfg,
                   device) -> dict:
    """Is the generator using the prompt? Per layer, the spread of the vectors across one dev
    batch's prompts against their static part (pedro_ext.diagnostics.vector_spread)."""
    batch = {k: v.to(device) for k, v in collate(dev_ex[:max(2, cfg.batch_size)], pad_id).items()}
    out = vector_spread(pedro, batch, adapter)
    return {k: ([_finite(x) for x in v] if isinstance(v, list) else
                _finite(v) if isinstance(v, float) else v) for k, v in out.items()}


def _encode_all(tokenizer, pairs, max_length: int, source: str) -> List[dict]:
    out = []
    for i, (p, r) in enumerate(pairs):
        try:
            out.append(encode(tokenizer, p, r, max_length))
        except ValueError as exc:
            raise ValueError(f"{source}[{i}]: {exc}") from None
    return out


def _fit(module, tokenizer, train_pairs, dev_pairs, cfg, groups, save, desc, adapter=None):
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = _encode_all(tokenizer, train_pairs, cfg.max_length, "train_pairs")
    dev_ex = _encode_all(tokenizer, dev_pairs, cfg.max_length, "dev_pairs")
    if not train_ex:
        raise ValueError("train_pairs is empty")
    for split, examples in (("train", train_ex), ("dev", dev_ex)):
        if examples and min(cfg.batch_size, len(examples)) < world:
            raise ValueError(f"{world} ranks need at least {world} examples per batch, but the "
                             f"{split} batches have {min(cfg.batch_size, len(examples))}")
    device = next(module.parameters()).device
    module.train()
    model = module
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False)
    bilevel = cfg.rational_mode == "bilevel"
    main_groups = [g for g in groups if not (bilevel and g["name"] == "rational")]
    rational_groups = [g for g in groups if bilevel and g["name"] == "rational"]
    opt = torch.optim.AdamW(main_groups)
    opt_r = torch.optim.AdamW(rational_groups) if rational_groups else None
    schedule = _schedule(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    # the held-out steps follow the schedule of the optimizer step they come after, not a
    # count of their own (that stretched the warm-up bilevel_every times and never decayed)
    rational_lrs = [g["lr"] for g in opt_r.param_groups] if opt_r else []
    main_params = [p for g in main_groups for p in g["params"]]
    trained = main_params + [p for g in rational_groups for p in g["params"]]
    train_iter = _batches(train_ex, cfg.batch_size, cfg.seed)
    dev_iter = _batches(dev_ex, cfg.batch_size, cfg.seed + 1) if dev_ex else None
    log_file = None
    if cfg.output_dir and rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        for kind in ("best", "final"):  # (another run's, with overwrite_output_dir)
            shutil.rmtree(os.path.join(cfg.output_dir, kind), ignore_errors=True)
        log_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w")
    history, best, best_step, bad_evals, best_state = [], math.inf, None, 0, None
    adapter_dir = None
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress or rank != 0)
    try:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            if opt_r:
                opt_r.zero_grad(set_to_none=True)
            loss = _step_loss(model, next(train_iter), pad_id, cfg.grad_accum, rank, world,
                              device)
            if opt_r:
                for g in rational_groups:  # the training split does not move the coefficients
                    for p in g["params"]:
                        p.grad = None
            # the learning rates this step uses (the scheduler moves them on afterwards)
            record = {"step": step + 1, "train_loss": _finite(loss),
                      **{f"lr_{g['name']}": g["lr"] for g in opt.param_groups}}
            opt.step()
            sched.step()
            if opt_r and (step + 1) % cfg.bilevel_every == 0:
                opt.zero_grad(set_to_none=True)
                opt_r.zero_grad(set_to_none=True)
                record["heldout_loss"] = _finite(_step_loss(model, next(dev_iter), pad_id,
                                                            cfg.grad_accum, rank, world, device))
                for p in main_params:  # the held-out split moves only the coefficients
                    p.grad = None
                for g, lr in zip(opt_r.param_groups, rational_lrs):
                    g["lr"] = lr * schedule(step)
                record.update({f"lr_{g['name']}": g["lr"] for g in opt_r.param_groups})
                opt_r.step()
            if dev_ex and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                dev_loss = evaluate(module, dev_ex, pad_id, max(1, cfg.batch_size // cfg.grad_accum),
                                    cfg.eval_batches)
                module.train()
                record["dev_loss"] = _finite(dev_loss)
                if adapter is not None and len(dev_ex) >= 2:
                    record["vector_spread"] = _vector_spread(module, adapter, dev_ex, pad_id,
                                                             cfg, device)
                if dev_loss < best:
                    best, best_step, bad_evals = dev_loss, step + 1, 0
                    best_state = [p.detach().clone() for p in trained]
                    if save is not None and rank == 0:
                        adapter_dir = save("best")
                else:
                    bad_evals += 1
            record["elapsed_s"] = time.time() - t0
            history.append(record)
            post = {"loss": f"{loss:.3f}"}
            if "dev_loss" in record:
                post["dev"] = f"{dev_loss:.3f}"
            bar.set_postfix(post)
            if log_file:
                log_file.write(json.dumps(record, allow_nan=False) + "\n")
                log_file.flush()
            if cfg.patience is not None and bad_evals >= cfg.patience:
                break
    finally:
        if log_file:
            log_file.close()
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(trained, best_state):
                p.copy_(b)
    elif save is not None and rank == 0:  # no dev split (or no finite dev loss): the final weights
        adapter_dir = save("final")
    module.eval()
    return {"best_dev_loss": _finite(best) if best_step is not None else None,
            "best_step": best_step, "steps": len(history), "history": history,
            "wall_s": time.time() - t0, "adapter_dir": adapter_dir}


if __name__ == "__main__":
    from .train_cli import main
    main()
