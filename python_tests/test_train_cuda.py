"""The training CLI on a GPU: the same adapter as on the CPU, the default device, torchrun's
environment (nccl, cuda:LOCAL_RANK) and the multi-rank code (DDP with device_ids, all_reduce of
device tensors) on one GPU. The CPU paths, DDP with 2 gloo ranks included, are in
test_train_cli.py; two nccl ranks need two GPUs and are not tested here."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import pedro_ext.train as train_mod
from pedro_ext import PedroConfig, get_pedro_model, train_cli

from conftest import requires_cuda
from tiny_models import CharTokenizer, tiny_model, toy_pairs

pytestmark = requires_cuda


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli, "load_model",
                        lambda name, dtype: (tiny_model().to(dtype), CharTokenizer(), "tiny-llama"))
    for split, n, seed in (("train", 32, 1), ("dev", 16, 2)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for p, r in toy_pairs(n, seed=seed):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return tmp_path


def _args(tmp, out, *extra):
    return ["--train", str(tmp / "train.jsonl"), "--dev", str(tmp / "dev.jsonl"),
            "--output-dir", str(tmp / out), "--r", "4", "--steps", "3", "--batch-size", "8",
            "--grad-accum", "2", "--lr", "1e-2", "--rational-lr", "1e-2", "--eval-every", "100",
            "--max-length", "64", "--no-progress", *extra]


def _weights(tmp, out):
    return load_file(str(tmp / out / "best" / "adapter_model.safetensors"))


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cuda_training_matches_cpu(data):
    train_cli.main(_args(data, "cpu", "--device", "cpu"))
    summary = train_cli.main(_args(data, "gpu", "--device", "cuda"))
    assert summary["best_step"] == 3
    cpu, gpu = _weights(data, "cpu"), _weights(data, "gpu")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-4)


def test_default_device_is_cuda_and_bfloat16_trains(data, capsys):
    train_cli.main(_args(data, "bf16", "--dtype", "bfloat16"))
    printed = json.loads(capsys.readouterr().out)
    assert printed["device"].startswith("cuda") and printed["dtype"] == "bfloat16"
    assert printed["best_dev_loss"] is not None


def test_torchrun_environment_uses_nccl_on_the_local_rank(data, monkeypatch):
    train_cli.main(_args(data, "plain", "--device", "cuda"))
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_port())).items():
        monkeypatch.setenv(k, v)
    seen = {}
    real_init = dist.init_process_group

    def spy(backend, **kwargs):
        seen.update(backend=backend, **kwargs)
        return real_init(backend, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    train_cli.main(_args(data, "torchrun", "--device", "cuda"))
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 0)
    assert not dist.is_initialized()
    plain, run = _weights(data, "plain"), _weights(data, "torchrun")
    for k in plain:
        torch.testing.assert_close(run[k], plain[k], rtol=1e-5, atol=1e-6)


def test_multi_rank_code_runs_on_a_gpu(monkeypatch):
    """One GPU cannot hold two nccl ranks: a 1-rank nccl group, with the rank count reported as
    2, runs the multi-rank code (DDP with device_ids, no_sync, all_reduce of device tensors)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_port()))
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    monkeypatch.setattr(train_mod, "_world", lambda: (0, 2))
    try:
        pedro = get_pedro_model(tiny_model().to(device), PedroConfig(r=4))
        summary = train_mod.train(pedro, CharTokenizer(), toy_pairs(32, seed=1),
                                  toy_pairs(16, seed=2),
                                  train_mod.TrainConfig(steps=2, batch_size=8, grad_accum=2,
                                                        eval_every=100, max_length=64,
                                                        progress=False))
    finally:
        dist.destroy_process_group()
    assert summary["best_dev_loss"] is not None
    assert all(p.device == device for p in pedro.adapter_parameters())
    assert any(p.abs().max() > 0 for n, p in pedro.named_parameters() if n.endswith("b_up"))
