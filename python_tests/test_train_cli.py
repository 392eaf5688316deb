"""`python -m pedro_ext.train`: help, argument and data errors before the model loads, devices
and dtypes, the summary, and DDP through the CLI (2 gloo ranks on the CPU)."""
import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pedro_ext import PedroConfig
from pedro_ext import train_cli
from pedro_ext.train import TrainConfig

from tiny_models import CharTokenizer, tiny_model, toy_pairs


def _tiny_loader(name, dtype):
    return tiny_model().to(dtype), CharTokenizer(), "tiny-llama"


def _no_model(name, dtype):
    raise AssertionError("the model was loaded before the arguments were checked")


def _jsonl(path, pairs):
    with open(path, "w") as f:
        for p, r in pairs:
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    return str(path)


def test_help_documents_every_flag_and_defaults_agree_with_the_configs(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    parser = train_cli.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    for flag in ("--pooling {mean,last,max,attention}", "--rational-mode {bilevel,joint,frozen}",
                 "--dtype {float32,bfloat16,float16}", "must contain {text}", "(default: 12)",
                 "initialisation (default: 0)", "pooled vector during training (default: 0.0)",
                 "Defaults (TrainConfig): lr 1e-3", "vector_spread",
                 '{"text": "...", "label": "..."}', "final/"):
        assert flag in " ".join(text.split()) or flag in text, flag
    args = parser.parse_args(["--train", "t", "--output-dir", "o"])
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("output_dir", "progress"):
            assert getattr(args, f.name) == getattr(TrainConfig(), f.name), f.name
    for f in ("r", "pooling", "init_scale", "dropout", "rational_init", "target_modules"):
        assert getattr(args, f) == getattr(PedroConfig(), f), f


@pytest.mark.parametrize("extra, message", [
    ([], "--rational-mode bilevel (the default) needs --dev"),
    (["--rational-mode", "joint", "--batch-size", "3", "--grad-accum", "2"],
     "--batch-size (3) must be a multiple of --grad-accum (2)"),
    (["--rational-mode", "joint", "--steps", "0"], "--steps must be a positive int"),
    (["--rational-mode", "joint", "--r", "0"], "--r must be a positive int"),
    (["--rational-mode", "joint", "--device", "nonsense"], "argument --device"),
    (["--rational-mode", "joint", "--dev", "MISSING"], "No such file"),
    (["--rational-mode", "joint", "--dev", "BAD"], "bad.jsonl:2: not valid JSON"),
    (["--rational-mode", "joint", "--dev", "LATIN1"], "latin1.jsonl:2: not UTF-8 text"),
    (["--rational-mode", "joint", "--dev", "EMPTY"], "empty.jsonl:2: the prompt is empty"),
    (["--rational-mode", "joint", "--device", "meta"], "argument --device: 'meta'"),
    (["--rational-mode", "joint", "--seed", str(2 ** 70)], "--seed must be an int in [0, 2**63)"),
    (["--rational-mode", "joint", "--output-dir", "PREVIOUS"], "holds another run's files"),
    (["--rational-mode", "joint", "--output-dir", "FILE"], "is not a folder"),
])
def test_errors_come_before_the_model_loads(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(train_cli, "load_model", _no_model)
    train = _jsonl(tmp_path / "train.jsonl", toy_pairs(4))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n'
                                            b'{"prompt": "caf\xe9", "response": "b"}\n')
    (tmp_path / "empty.jsonl").write_text('{"prompt": "a", "response": "b"}\n'
                                          '{"prompt": "", "response": "b"}\n')
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "metrics.jsonl").write_text("")
    (tmp_path / "file").write_text("")
    extra = [{"MISSING": str(tmp_path / "missing.jsonl"), "BAD": str(tmp_path / "bad.jsonl"),
              "LATIN1": str(tmp_path / "latin1.jsonl"), "EMPTY": str(tmp_path / "empty.jsonl"),
              "PREVIOUS": str(tmp_path / "previous"), "FILE": str(tmp_path / "file")}
             .get(a, a) for a in extra]
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--train", train, "--output-dir", str(tmp_path / "out")] + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--model", "MISSING"], "argument --model: cannot load"),
    (["--target-modules", "q_proj", "nope_proj"], "argument --target-modules: decoder layer 0 has no"),
])
def test_model_and_target_errors_are_argument_errors(tmp_path, monkeypatch, capsys, extra, message):
    if "MISSING" not in extra:
        monkeypatch.setattr(train_cli, "load_model", _tiny_loader)
    extra = [str(tmp_path / "no-such-model") if a == "MISSING" else a for a in extra]
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--train", _jsonl(tmp_path / "t.jsonl", toy_pairs(4)), "--output-dir",
                        str(tmp_path / "out"), "--rational-mode", "joint", "--no-progress"] + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_seed_sets_the_adapters_initialisation(tmp_path, monkeypatch):
    """Two runs of one command give the same adapter (with lr 0: its initialisation)."""
    monkeypatch.setattr(train_cli, "load_model", _tiny_loader)
    weights = []
    for run, seed in ((1, 0), (2, 0), (3, 1)):
        torch.manual_seed(1000 + run)  # whatever the global generator holds before the CLI
        out = tmp_path / f"out{run}"
        train_cli.main(["--train", _jsonl(tmp_path / "t.jsonl", toy_pairs(8)), "--output-dir",
                        str(out), "--rational-mode", "joint", "--r", "4", "--steps", "1",
                        "--batch-size", "4", "--lr", "0", "--static-lr", "0",
                        "--rational-lr", "0", "--seed", str(seed), "--no-progress"])
        weights.append(load_file(str(out / "final" / "adapter_model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_cli_trains_in_bfloat16_without_dev_and_says_where_the_adapter_is(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(train_cli, "load_model", _tiny_loader)
    out = tmp_path / "out"
    summary = train_cli.main(["--train", _jsonl(tmp_path / "t.jsonl", toy_pairs(8)),
                              "--output-dir", str(out), "--rational-mode", "joint", "--r", "4",
                              "--steps", "3", "--batch-size", "4", "--device", "cpu",
                              "--dtype", "bfloat16", "--no-progress"])
    printed = json.loads(capsys.readouterr().out)  # strict JSON: no Infinity / NaN
    assert printed["adapter_dir"] == str(out / "final") == summary["adapter_dir"]
    assert printed["best_dev_loss"] is None and printed["best_step"] is None
    assert (printed["device"], printed["dtype"], printed["world_size"]) == ("cpu", "bfloat16", 1)
    config = json.load(open(out / "final" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == "tiny-llama" and config["r"] == 4
    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # adapter stays float32
    assert any(w.abs().max() > 0 for k, w in weights.items() if k.endswith("b_up"))
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["lr_generator"] > 0 for r in lines)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(tmp, out):
    return ["--train", os.path.join(tmp, "train.jsonl"), "--dev", os.path.join(tmp, "dev.jsonl"),
            "--output-dir", os.path.join(tmp, out), "--r", "4", "--steps", "4",
            "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-2", "--static-lr", "2e-2",
            "--rational-lr", "1e-2", "--eval-every", "100", "--max-length", "64",
            "--device", "cpu", "--no-progress"]


def _ddp_worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train_cli.load_model = _tiny_loader
    train_cli.main(_cli_args(tmp, "ddp"))
    assert not torch.distributed.is_initialized()  # the CLI closed its process group


def test_ddp_through_the_cli_matches_single_process(tmp_path, monkeypatch):
    _jsonl(tmp_path / "train.jsonl", toy_pairs(32, seed=1))
    _jsonl(tmp_path / "dev.jsonl", toy_pairs(16, seed=2))
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    monkeypatch.setattr(train_cli, "load_model", _tiny_loader)
    train_cli.main(_cli_args(str(tmp_path), "single"))
    ddp = load_file(str(tmp_path / "ddp" / "best" / "adapter_model.safetensors"))
    single = load_file(str(tmp_path / "single" / "best" / "adapter_model.safetensors"))
    assert set(ddp) == set(single)
    assert any(v.abs().max() > 0 for k, v in single.items() if k.endswith("b_up"))  # it trained
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6)


def test_smollm2_adapters_record_a_portable_model_name(tmp_path):
    from pedro_ext import get_pedro_model
    from pedro_ext.offline import SMOLLM2_NAME

    model, _, name = train_cli.load_model("smollm2", torch.float32)
    assert name == SMOLLM2_NAME == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pedro = get_pedro_model(model, PedroConfig(r=2))
    pedro.save_pretrained(str(tmp_path))
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["base_model_name_or_path"] == SMOLLM2_NAME  # not the local cache folder
