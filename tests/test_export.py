"""`omniweave export`: a trained checkpoint exported to an HF folder gives the trained model's
logits in `transformers`; an HF folder imported to DCP, loaded into a sharded model (0 steps)
and exported again holds the same tensors, bit for bit; OmniModels export per component."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from omniweave.cli import main
from omniweave.models.weights import load_full_weights
from omniweave.train.export import import_hf, load_omni, read_model_state, write_hf
from tests.distributed import run_distributed
from tests.models import IN_PROCESS_DATA, TINY, hf_model

STEPS = 3


def _train(args: list[str]) -> None:
    from omniweave.config import load_config
    from omniweave.train.trainer import Trainer

    Trainer(load_config(None, args)).run()


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "model,layout", [("qwen2", {"parallel.dp_shard": 2}), ("qwen3_moe", {"parallel.ep": 2})]
)
def test_trained_checkpoint_exported_to_hf_gives_the_trained_logits(
    corpus, tmp_path, model, layout, capfd
):
    run = str(tmp_path / "run")
    settings = {
        "model.config": TINY[model],
        "data.train_path": corpus["train_path"],
        "data.tokenizer_path": corpus["tokenizer_path"],
        "data.max_seq_len": 64,
        "train.output_dir": run,
        "train.max_steps": STEPS,
        "train.global_batch_size": 4,
        "train.lr": 1e-2,
        "train.peak_flops": 1e12,
        **IN_PROCESS_DATA,
        "train.save_final": True,
        "train.export_hf_at_end": True,
        "checkpoint.every_steps": STEPS,
        "log.progress": False,
        "log.tensorboard": False,
        "log.plot": False,
        **layout,
    }
    args = [f"--{key}={json.dumps(value)}" for key, value in settings.items()]
    run_distributed(_train, 2, args)
    # gathering FSDP-over-EP weights whole is not reported as DTensor's "suboptimal" gather
    assert "suboptimal" not in capfd.readouterr().err
    exported = str(tmp_path / "hf")
    checkpoint = os.path.join(run, "checkpoints", f"step_{STEPS:08d}")
    assert main(["export", checkpoint, "--format", "hf", exported]) == 0

    loaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    trained = hf_model(model).eval()  # the same architecture, weights from train.save_final
    load_full_weights(trained, os.path.join(run, "final"))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained(ids).logits, loaded(ids).logits
    assert (got - expected).abs().max() <= 1e-6
    initial = hf_model(model).eval()  # a guard: training moved the logits well past that
    with torch.no_grad():
        assert (initial(ids).logits - expected).abs().max() > 1e-2
    # train.export_hf_at_end (of the live, sharded model) writes the same tensors; so does the
    # export of the run folder (its latest checkpoint).
    _assert_identical(_tensors(os.path.join(run, "hf")), _tensors(exported))
    assert main(["export", run, "--format", "hf", str(tmp_path / "latest")]) == 0
    _assert_identical(_tensors(str(tmp_path / "latest")), _tensors(exported))

    tokenizer = AutoTokenizer.from_pretrained(exported)
    original = AutoTokenizer.from_pretrained(corpus["tokenizer_path"])
    text = "the model learns shards of every layer"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]


def _warm_start_and_export(checkpoint: str, hf_folder: str, out: str) -> None:
    """Build the sharded training model (random init), load the model-only checkpoint into it
    as the trainer's warm start does, and export it at once (0 training steps)."""
    import torch.distributed as dist

    from omniweave.data.processors import load_tokenizer
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.models.loader import build_model, load_hf_config
    from omniweave.train.checkpoint import Checkpointer
    from omniweave.train.export import export_live

    config = load_hf_config(hf_folder, None, "sdpa")
    ep = 2 if getattr(config, "num_experts", None) else 1
    model = build_model(
        config, ParallelState(resolve_degrees(2, ep=ep), torch.device("cpu")), seed=1
    )
    optimizer = torch.optim.AdamW(model.parameters())
    state = Checkpointer(out + ".run", model, optimizer, 1, False).load(checkpoint)
    assert state["model_only"] and not optimizer.state  # the optimizer starts afresh
    export_live(model, config, load_tokenizer(hf_folder), out, dist.get_rank() == 0)


@pytest.mark.parametrize("model,dtype", [("qwen2", torch.float32), ("qwen3_moe", torch.bfloat16)])
def test_hf_folder_imported_and_exported_again_is_bit_identical(corpus, tmp_path, model, dtype):
    original = str(tmp_path / "original")
    hf_model(model).to(dtype).save_pretrained(original)
    AutoTokenizer.from_pretrained(corpus["tokenizer_path"]).save_pretrained(original)
    imported = str(tmp_path / "imported")
    assert main(["export", original, "--format", "dcp", imported]) == 0
    checkpoint = os.path.join(imported, "checkpoints", "step_00000000")
    with open(os.path.join(checkpoint, "trainer.json")) as f:
        assert json.load(f)["model_only"] is True

    live = str(tmp_path / "live")  # through a sharded (and, for MoE, expert-parallel) model
    run_distributed(_warm_start_and_export, 2, checkpoint, original, live)
    expected = _tensors(original)
    got = _tensors(live)  # trained weights are float32: compare in the original's dtype
    _assert_identical({k: v.to(dtype) for k, v in got.items()}, expected)

    offline = str(tmp_path / "offline")  # in one process, cast back to the original's dtype
    config = AutoModelForCausalLM.from_pretrained(original).config
    tokenizer = AutoTokenizer.from_pretrained(original)
    write_hf(read_model_state(checkpoint), config, tokenizer, offline, dtype=dtype)
    _assert_identical(_tensors(offline), expected)
    assert AutoTokenizer.from_pretrained(offline).get_vocab() == tokenizer.get_vocab()


def test_omni_model_exports_each_component_and_imports_back(corpus, tmp_path):
    from omniweave.models.omni.model import OmniModel
    from omniweave.models.omni.vq import VQTokenizer, load_vq, save_vq

    vq = str(tmp_path / "vq.pt")
    save_vq(VQTokenizer(codebook_size=8, width=8, code_dim=4), vq)
    omni = {
        "encoders": {
            "image": {"type": "vision", "placeholder": 512, "width": 16, "heads": 2, "depth": 1},
            "audio": {"type": "audio", "placeholder": 513, "width": 16, "heads": 2, "n_mels": 8},
        },
        "decoders": {"draw": {"type": "image", "tokenizer_path": vq, "code_offset": 514}},
    }
    torch.manual_seed(0)
    foundation = hf_model("qwen2", vocab_size=528)
    model = OmniModel.from_config(foundation, omni["encoders"])
    state = model.state_dict()
    out = str(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(corpus["tokenizer_path"])
    write_hf(state, foundation.config, tokenizer, out, omni)

    with open(os.path.join(out, "omni_index.json")) as f:
        index = json.load(f)
    assert index["encoders"] == {"image": "encoders/image", "audio": "encoders/audio"}
    with open(os.path.join(out, "encoders", "audio", "config.json")) as f:
        assert json.load(f) == omni["encoders"]["audio"]
    with open(os.path.join(out, index["decoders"]["draw"], "config.json")) as f:
        copied = os.path.join(out, json.load(f)["tokenizer_path"])
    assert load_vq(copied).state_dict().keys() == load_vq(vq).state_dict().keys()
    AutoTokenizer.from_pretrained(os.path.join(out, "foundation"))

    loaded = load_omni(out).state_dict()
    _assert_identical(loaded, state)
    checkpoint = import_hf(out, str(tmp_path / "imported"))
    _assert_identical(read_model_state(checkpoint), state)


def test_export_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["export", str(tmp_path), "--format", "hf", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "hf", str(tmp_path / "new")]) == 2
    assert "neither a DCP checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "dcp", str(tmp_path / "new")]) == 2
    assert "neither an HF model folder" in capsys.readouterr().err
