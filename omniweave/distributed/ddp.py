"""Pure data parallelism: every rank holds the whole fp32 model, so gradients need one
all-reduce, which DDP does in a few large buckets while the backward still runs.

FSDP on the same ranks would gather every unit's weights twice per step and reduce-scatter
its gradients: three collectives per unit instead of one per bucket. The composable
``replicate`` applies DDP in place, so parameter names (and checkpoints) stay the model's.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable.replicate import replicate
from transformers import PretrainedConfig

from omniweave.distributed.host_average import (
    SharedMemoryAverage,
    average_in_shared_memory,
    gradient_bytes,
    shared_memory_fits,
)
from omniweave.distributed.parallel_state import ParallelState


def uses_ddp(state: ParallelState, dtype: str, cpu_offload: bool) -> bool:
    """Replicas only (``dp_replicate`` is the world), fp32, nothing offloaded: DDP.
    Lower precision and offload keep FSDP's mixed-precision and offload policies."""
    d = state.degrees
    whole = d.dp_shard == d.sequence == d.tp == d.pp == d.ep == 1
    return d.dp_replicate > 1 and whole and dtype == "float32" and not cpu_offload


def may_leave_parameters_unused(config: PretrainedConfig, omni: bool) -> bool:
    """Whether a step can leave a trainable parameter without a gradient: an OmniModel's
    or a native multimodal model's encoder without media, an MoE expert without tokens.
    A plain language model uses every parameter in every step."""
    text = config.get_text_config()
    return omni or text is not config or hasattr(text, "router_aux_loss_coef")


def apply_ddp(model: nn.Module, state: ParallelState, unused_parameters: bool) -> None:
    """Average ``model``'s gradients over the data-parallel ranks after each backward
    (skipped while ``set_requires_gradient_sync(False)`` accumulates). With
    ``unused_parameters``, DDP walks each step's autograd graph for parameters the step
    left unused; without, it skips that walk (3-4% of a step at 2 processes on CPU). CPU
    ranks on one host average through shared memory (``host_average.py``) instead of gloo."""
    group = state.dp_mesh.get_group()
    on_host = shared_memory_fits(model, group, state.device)
    replicate(
        model,
        device_id=state.device,
        process_group=group,
        find_unused_parameters=unused_parameters,
        # through shared memory each bucket is a meeting of the ranks: one bucket, one meeting
        bucket_cap_mb=gradient_bytes(model) / 2**20 + 1 if on_host else None,
    )
    if on_host:
        model.register_comm_hook(SharedMemoryAverage(group), average_in_shared_memory)
