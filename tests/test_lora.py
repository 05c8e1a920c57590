"""LoRA (``model.lora``, through peft): every layout trains the curve of a plain peft model in
a plain PyTorch loop; base weights never change; checkpoints hold the adapters and resume on
another layout; the PEFT export loads with peft and equals the merged Hugging Face export."""

from __future__ import annotations

import json

import pytest
import torch

from omniweave.config import load_config
from omniweave.models.lora import adapter_init, base_name, is_adapter
from tests.distributed import run_distributed
from tests.models import hf_model
from tests.test_parity import STEPS, _assert_close, _overrides, reference_losses

LORA = {"rank": 4, "alpha": 8}


def _lora_runs(runs: list[tuple[str, list[str]]]) -> tuple[dict, dict]:
    """Train each (name, overrides); every rank returns the curves, rank 0 also each run's
    whole unmerged state (adapters and base weights) after training."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from omniweave.train.trainer import Trainer

    curves, states = {}, {}
    for name, overrides in runs:
        trainer = Trainer(load_config(None, overrides))
        curves[name] = [(row["loss"], row["grad_norm"]) for row in trainer.run()]
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.model, options=options)
        states[name] = state if dist.get_rank() == 0 else None
    return curves, states


def _peft_reference(model):
    """peft's own LoRA on every linear layer, adapters set to OmniWeave's seeded init."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules="all-linear")
    inject_adapter_in_model(config, model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name):
                param.copy_(adapter_init(name, param.shape, load_config(None, []).train.seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {}
    # No router aux loss: it is a mean per micro-batch, and layouts split the batch differently.
    for family, extra in (("qwen2", {}), ("qwen3_moe", {"router_aux_loss_coef": 0.0})):
        paths[family] = str(tmp_path_factory.mktemp(family))
        hf_model(family, seed=1, **extra).save_pretrained(paths[family])
    return paths


def _run(models, corpus, root, family: str, name: str, **extra) -> tuple[str, list[str]]:
    out = str(root / name.replace(" ", "_").replace("=", ""))
    lora = extra.pop("model.lora", LORA)
    overrides = _overrides(models[family], corpus, out, **extra)
    return name, [*overrides, f"--model.lora={json.dumps(lora)}", "--train.export_hf_at_end=false"]


def test_lora_matches_peft_on_every_layout_and_only_adapters_train(models, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    moe = {"model.lora": {**LORA, "target_modules": ["q_proj", "v_proj"]}}
    single = [
        _run(models, corpus, tmp_path, "qwen2", "qwen2 1 process", **{"train.micro_batch_size": 8}),
        _run(models, corpus, tmp_path, "qwen3_moe", "moe 1 process", **moe),
    ]
    two = [
        _run(
            models, corpus, tmp_path, "qwen2", "qwen2 dp_shard=2",
            **{"train.micro_batch_size": 2, "checkpoint.every_steps": 3},
        ),
        _run(
            models, corpus, tmp_path, "qwen3_moe", "moe ep=2",
            **moe, **{"parallel.ep": 2, "train.micro_batch_size": 4},
        ),
    ]  # fmt: skip
    saved = tmp_path / "qwen2_dp_shard2" / "checkpoints" / "step_00000003"
    four = [
        _run(
            models, corpus, tmp_path, "qwen2", "qwen2 dp_shard=2 x sp=2 packed",
            **{"parallel.dp_shard": 2, "parallel.sp": 2, "data.packing": True},
            **{"train.micro_batch_size": 2, "train.activation_checkpointing": "full"},
        ),
        _run(
            models, corpus, tmp_path, "qwen2", "qwen2 resumed at dp_shard=4",
            **{"parallel.dp_shard": 4, "checkpoint.resume": str(saved)},
        ),
    ]  # fmt: skip
    curves, states = run_distributed(_lora_runs, 1, single)[0]
    for size, runs in ((2, two), (4, four)):
        per_rank = run_distributed(_lora_runs, size, runs)
        assert all(rank[0] == per_rank[0][0] for rank in per_rank), "ranks disagree"
        curves.update(per_rank[0][0])
        states.update(per_rank[0][1])

    reference = reference_losses(models["qwen2"], corpus, adapt=_peft_reference)
    for name in ("qwen2 1 process", "qwen2 dp_shard=2", "qwen2 dp_shard=2 x sp=2 packed"):
        _assert_close(curves[name], reference, name)
    _assert_close(curves["moe ep=2"], curves["moe 1 process"], "moe ep=2")
    resumed = curves["qwen2 resumed at dp_shard=4"]
    assert len(resumed) == STEPS - 3
    _assert_close(curves["qwen2 dp_shard=2"][:3] + resumed, reference, "resumed")

    for name, state in states.items():
        family = "qwen3_moe" if name.startswith("moe") else "qwen2"
        base = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)
        base = base.state_dict()
        frozen = {base_name(k): v for k, v in state.items() if not is_adapter(k)}
        changed = [k for k in base if not torch.equal(frozen[k], base[k])]
        assert not changed, f"{name}: base weights changed: {changed[:3]}"
        adapters_b = [v for k, v in state.items() if ".lora_B." in k]
        assert adapters_b and all(v.abs().max() > 0 for v in adapters_b), name
    moe_targets = {
        k.split(".lora_")[0].rsplit(".", 1)[1] for k in states["moe ep=2"] if is_adapter(k)
    }
    assert moe_targets == {"q_proj", "v_proj"}

    # The checkpoints hold the adapters (and their optimizer state) only.
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(saved)).read_metadata()
    weights = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
    assert weights and all(is_adapter(k) for k in weights), weights[:3]


def test_peft_export_loads_with_peft_and_equals_the_merged_export(models, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from omniweave.cli import main

    saves = {"parallel.dp_shard": 2, "checkpoint.every_steps": STEPS}
    run = _run(models, corpus, tmp_path, "qwen2", "run", **saves)
    run_distributed(_lora_runs, 2, [run])
    out = tmp_path / "run"
    assert main(["export", str(out), "--format", "peft", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(out), "--format", "hf", str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(models["qwen2"], dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters did learn something
    assert torch.allclose(adapted, merged, rtol=0, atol=1e-5), (adapted - merged).abs().max()


def test_lora_mistakes_are_one_line_errors(models, corpus, tmp_path):
    from omniweave.train.checks import validate

    def error(lora) -> str:
        overrides = _overrides(models["qwen3_moe"], corpus, str(tmp_path / "x"))
        cfg = load_config(None, [*overrides, f"--model.lora={json.dumps(lora)}"])
        with pytest.raises(ValueError) as caught:
            validate(cfg, 1)
        return str(caught.value)

    assert "unknown keys ['r']" in error({"r": 8})
    assert "rank=0" in error({"rank": 0})
    assert "no module's name ends in 'qkv'" in error({"target_modules": ["qkv"]})
    assert "Qwen3MoeExperts" in error({"target_modules": ["experts"]})
    assert "the LM head" in error({"target_modules": ["lm_head"]})
    assert "target_modules='q_proj'" in error({"target_modules": "q_proj"})
