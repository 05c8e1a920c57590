"""Meta-device build + sharded safetensors loading reproduces the HF model exactly."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.models import hf_model


def _load_and_forward(paths: list[str], input_ids: torch.Tensor) -> list[dict]:
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.models import loader

    read = []
    real_safe_open = loader.safe_open

    class RecordingFile:
        """Wraps a safetensors file and records the number of elements each read returns."""

        def __init__(self, *args, **kwargs):
            self._file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def get_slice(self, name):
            whole = self._file.get_slice(name)

            class Slice:
                def __getitem__(self, index):
                    tensor = whole[index]
                    read.append(tensor.numel())
                    return tensor

            return Slice()

    loader.safe_open = RecordingFile
    state = ParallelState(resolve_degrees(4, dp_shard=4), torch.device("cpu"))
    results = []
    for path in paths:
        read.clear()
        config = loader.load_hf_config(path, None, "sdpa")
        model = loader.build_model(config, state, path)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        local = sum(p.to_local().numel() for p in model.parameters())
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
        results.append({"logits": logits, "read": sum(read), "local": local, "tied": tied})
    return results


def test_sharded_load_matches_hf_logits(tmp_path):
    """Qwen2 (tied), Llama (untied) and Qwen3, each from one file and from 40 KB shards."""
    cases = []  # (folder, expected logits, tied, total parameter count)
    input_ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    for family in ("qwen2", "llama", "qwen3"):
        reference = hf_model(family, seed=3)
        with torch.no_grad():
            logits = reference(input_ids=input_ids).logits
        total = sum(p.numel() for p in reference.parameters())
        for kind, shard_size in (("single", "10GB"), ("sharded", "40KB")):
            path = tmp_path / family / kind
            reference.save_pretrained(path, max_shard_size=shard_size)
            index_written = (path / "model.safetensors.index.json").exists()
            assert index_written == (kind == "sharded")
            cases.append((str(path), logits, reference.config.tie_word_embeddings, total))
    per_rank = run_distributed(_load_and_forward, 4, [case[0] for case in cases], input_ids)
    for rank, results in enumerate(per_rank):
        for (path, logits, tied, total), result in zip(cases, results, strict=True):
            torch.testing.assert_close(result["logits"], logits, rtol=0, atol=1e-6)
            # Each rank reads exactly the elements it holds, about a quarter of the model.
            assert result["read"] == result["local"], (rank, path)
            assert result["read"] < total / 2, (rank, path)
            assert result["tied"] == tied, path


def _sharded_after_forward(reshard_after_forward: bool) -> bool:
    """Whether a decoder layer's weight is a (sharded) DTensor again after a forward."""
    from torch.distributed.tensor import DTensor

    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.models.loader import build_model

    config = hf_model("llama").config
    state = ParallelState(resolve_degrees(2), torch.device("cpu"))
    model = build_model(config, state, reshard_after_forward=reshard_after_forward)
    model(input_ids=torch.arange(8).unsqueeze(0), use_cache=False).logits.sum()
    return isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)


def test_reshard_after_forward_false_keeps_the_gathered_weights_for_the_backward():
    for reshard in (True, False):
        assert run_distributed(_sharded_after_forward, 2, reshard) == [reshard, reshard]


def test_cpu_trades_memory_for_fewer_collectives_by_default_and_a_gpu_does_not():
    from omniweave.distributed.fsdp import gpu_default

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert gpu_default(None, cpu) is False  # gloo: collectives hold up the step
    assert gpu_default(None, gpu) is True
    assert gpu_default(True, cpu) is True
    assert gpu_default(False, gpu) is False


def _gradient_held_after_a_micro_batch(sharded: bool) -> tuple[bool, int | None]:
    """Whether a layer's weight has a gradient after the first of several micro-batches, and
    the elements of this rank's part of it."""
    from omniweave.distributed.fsdp import sync_gradients
    from omniweave.distributed.parallel_state import ParallelState, resolve_degrees
    from omniweave.models.loader import build_model

    config = hf_model("llama").config
    state = ParallelState(resolve_degrees(2), torch.device("cpu"))
    model = build_model(config, state)
    sync_gradients(model, last=False, sharded=sharded)
    model(input_ids=torch.arange(8).unsqueeze(0), use_cache=False).logits.sum().backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad
    return grad is not None, None if grad is None else grad.to_local().numel()


def test_sharded_accumulation_keeps_only_this_ranks_part_of_the_gradients():
    numel = hf_model("llama").model.layers[0].mlp.up_proj.weight.numel()
    assert run_distributed(_gradient_held_after_a_micro_batch, 2, True) == [(True, numel // 2)] * 2
    # unsharded: FSDP holds the whole gradient inside, none reduced into the shard yet
    assert run_distributed(_gradient_held_after_a_micro_batch, 2, False) == [(False, None)] * 2
