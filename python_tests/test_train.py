"""Training recipe: bi-level rational updates, loss goes down, best checkpoint, DDP."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook

import pedro_ext.train as train_mod
from pedro_ext import PedroConfig, PedroModel, get_pedro_model
from pedro_ext.train import TrainConfig, train

from tiny_models import CharTokenizer, tiny_model, toy_pairs


def _pedro(seed=0):
    return get_pedro_model(tiny_model(seed=seed), PedroConfig(r=4))


def test_bilevel_moves_coefficients_only_on_heldout_steps(monkeypatch):
    pedro = _pedro()
    tok = CharTokenizer()
    train_pairs, dev_pairs = toy_pairs(16, seed=1), toy_pairs(8, seed=2)
    dev_ids = {tuple(train_mod.encode(tok, p, r, 64)["input_ids"]) for p, r in dev_pairs}
    rational = {id(p) for p in pedro.rational_parameters()}
    generator = {id(p) for p in pedro.adapter_parameters()} - rational
    params = {id(p): p for p in pedro.adapter_parameters()}
    events = []
    real_step_loss = train_mod._step_loss

    def spy(model, examples, *a, **k):
        split = "dev" if all(tuple(e["input_ids"]) in dev_ids for e in examples) else "train"
        events.append(("batch", split))
        return real_step_loss(model, examples, *a, **k)

    snapshot = {i: p.detach().clone() for i, p in params.items()}

    def after_step(opt, args, kwargs):
        changed = {i for i, p in params.items() if not torch.equal(p, snapshot[i])}
        events.append(("step", changed))
        for i, p in params.items():
            snapshot[i] = p.detach().clone()

    monkeypatch.setattr(train_mod, "_step_loss", spy)
    handle = register_optimizer_step_post_hook(after_step)
    try:
        train(pedro, tok, train_pairs, dev_pairs,
              TrainConfig(steps=3, batch_size=4, lr=1e-2, rational_lr=1e-2, eval_every=100,
                          max_length=64, progress=False))
    finally:
        handle.remove()
    kinds = [(e[0], e[1] if e[0] == "batch" else None) for e in events]
    assert kinds == [("batch", "train"), ("step", None), ("batch", "dev"), ("step", None)] * 3
    moved_in_training = set()
    for i in range(0, len(events), 4):
        # (at the first step only w_up / b_up move: with w_up = 0 the rest get zero gradient)
        assert events[i + 1][1] and events[i + 1][1] <= generator, "training step: generator only"
        assert events[i + 3][1] and events[i + 3][1] <= rational, "held-out step: coefficients only"
        moved_in_training |= events[i + 1][1]
    assert moved_in_training == generator


def test_frozen_and_joint_modes():
    tok = CharTokenizer()
    for mode, should_move in (("frozen", False), ("joint", True)):
        pedro = _pedro()
        before = [p.detach().clone() for p in pedro.rational_parameters()]
        train(pedro, tok, toy_pairs(8), [], TrainConfig(steps=2, batch_size=4, rational_mode=mode,
                                                         rational_lr=1e-2, progress=False))
        moved = any(not torch.equal(a, b) for a, b in zip(before, pedro.rational_parameters()))
        assert moved == should_move, mode


def test_training_lowers_dev_loss_and_saves_the_best(tmp_path):
    tok = CharTokenizer()
    pedro = _pedro()
    base = {k: v.clone() for k, v in pedro.base_model.state_dict().items() if "pedro" not in k}
    dev = toy_pairs(16, seed=5)
    dev_ex = [train_mod.encode(tok, p, r, 64) for p, r in dev]
    start = train_mod.evaluate(pedro, dev_ex, tok.pad_token_id)
    summary = train(pedro, tok, toy_pairs(64, seed=4), dev,
                    TrainConfig(steps=40, batch_size=8, lr=2e-2, rational_lr=1e-3, eval_every=10,
                                max_length=64, output_dir=str(tmp_path), progress=False))
    assert summary["best_dev_loss"] < start - 0.3, (start, summary["best_dev_loss"])
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert len(lines) == summary["steps"]
    for k, v in pedro.base_model.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    reloaded = PedroModel.from_pretrained(tiny_model(), str(tmp_path / "best"))
    got = train_mod.evaluate(reloaded, dev_ex, tok.pad_token_id)
    assert got == pytest.approx(summary["best_dev_loss"], rel=1e-5)


def test_early_stopping_stops():
    summary = train(_pedro(), CharTokenizer(), toy_pairs(8), toy_pairs(4, seed=9),
                    TrainConfig(steps=50, batch_size=4, lr=0.0, rational_lr=0.0, eval_every=1,
                                patience=2, progress=False))
    assert summary["steps"] == 3  # best at step 1, then two evaluations without improvement


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    pedro = _pedro(seed=0)
    train(pedro, CharTokenizer(), toy_pairs(32, seed=1), toy_pairs(16, seed=2), _ddp_cfg())
    if rank == 0:
        torch.save(pedro.adapter_state_dict("default"), os.path.join(out_dir, "ddp.pt"))
    torch.distributed.destroy_process_group()


def _ddp_cfg():
    return TrainConfig(steps=4, batch_size=8, grad_accum=2, lr=1e-2, rational_lr=1e-2,
                       eval_every=100, max_length=64, progress=False)


def test_ddp_matches_single_process(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ddp = torch.load(tmp_path / "ddp.pt")
    pedro = _pedro(seed=0)
    train(pedro, CharTokenizer(), toy_pairs(32, seed=1), toy_pairs(16, seed=2), _ddp_cfg())
    single = pedro.adapter_state_dict("default")
    start = _pedro(seed=0).adapter_state_dict("default")
    assert any(not torch.equal(single[k], start[k]) for k in single)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6)
