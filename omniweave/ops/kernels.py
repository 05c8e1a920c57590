"""Faster kernels chosen in config, applied to an unmodified model from outside.

- ``train.kernels: liger``: liger-kernel's fused RMSNorm, RoPE and SwiGLU (Triton, so a
  CUDA GPU) patched into the model instance; ``torch`` (the default) keeps the
  reference implementations. Fused cross-entropy is ``train.cross_entropy: chunked``.
- ``train.compile: true``: each decoder block compiled with ``torch.compile`` (one graph
  per block, before FSDP wraps it, so FSDP's collectives stay outside the graphs; packed
  rows keep it one graph through ``ops/packed_attention.py``'s operator).
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch import nn

KERNELS = ("torch", "liger")


def check_kernels(kernels: str) -> None:
    """``liger`` needs liger-kernel installed and a CUDA GPU (a start-up ValueError)."""
    if kernels != "liger":
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("train.kernels=liger needs liger-kernel: pip install liger-kernel.")
    if not torch.cuda.is_available():
        raise ValueError(
            "train.kernels=liger runs Triton kernels on a CUDA GPU and none is visible; "
            "use train.kernels=torch here."
        )


def apply_kernels(model: nn.Module, kernels: str) -> None:
    """Patch liger-kernel's RMSNorm, RoPE and SwiGLU into ``model`` (``kernels=liger``)."""
    if kernels != "liger":
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"train.kernels=liger: liger-kernel has no kernels for {model_type}.")
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
    wanted["fused_linear_cross_entropy"] = False
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{name: on for name, on in wanted.items() if name in accepted})


def compile_blocks(model: nn.Module, block_classes: tuple[str, ...]) -> int:
    """``torch.compile`` every block (a module whose class is in ``block_classes``) in place:
    parameter names do not change. Returns the number of compiled blocks."""
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    for block in blocks:
        block.compile()
    return len(blocks)
