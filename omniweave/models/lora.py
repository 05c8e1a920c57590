"""LoRA adapters (``model.lora``) through ``peft``, injected into the foundation on the meta
device before any parallelism is applied, so FSDP, Ulysses and EP wrap them like any layer.

Base weights are frozen; only the adapters train and are checkpointed. Parameter names gain
``.base_layer`` (the frozen linear) and ``.lora_A.default`` / ``.lora_B.default``;
``base_name`` maps them back to the Hugging Face names the weight files use.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

ADAPTER = "default"  # peft's name of the one adapter
ALL_LINEAR = "all-linear"
KEYS = ("rank", "alpha", "dropout", "target_modules")


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: adapter rank, ``alpha`` (the update is scaled by alpha / rank), dropout
    on the adapter's input, and which linear layers get one (name suffixes or all-linear)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, entry: dict) -> LoraSettings:
        """The settings of a ``model.lora`` mapping; ValueError naming the bad key."""
        unknown = sorted(set(entry) - set(KEYS))
        if unknown:
            raise ValueError(f"model.lora: unknown keys {unknown}; use {', '.join(KEYS)}.")
        settings = cls(**entry)
        rank, alpha, dropout = settings.rank, settings.alpha, settings.dropout
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"model.lora.rank={rank!r}: use an integer >= 1 (e.g. 8, 16).")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"model.lora.alpha={alpha!r}: use a number > 0 (often 2 x rank).")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"model.lora.dropout={dropout!r}: use a number in [0, 1).")
        targets = settings.target_modules
        if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            return cls(rank, float(alpha), float(dropout), tuple(targets))
        if targets != ALL_LINEAR:
            raise ValueError(
                f"model.lora.target_modules={targets!r}: use '{ALL_LINEAR}' or a list of module "
                "name suffixes, e.g. [q_proj, v_proj]."
            )
        return cls(rank, float(alpha), float(dropout), ALL_LINEAR)


def target_names(model: nn.Module, targets: tuple[str, ...] | str) -> list[str]:
    """Full names of the linear layers ``targets`` selects in ``model`` (a foundation LM).
    ``all-linear``: every ``nn.Linear`` but the LM head. ValueError for a suffix that names no
    module, or one that is not a linear layer (MoE experts are fused tensors, routers are not
    ``nn.Linear``; the LM head is never adapted)."""
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    if targets == ALL_LINEAR:
        return [n for n, m in modules.items() if isinstance(m, nn.Linear) and m is not head]
    names = []
    for suffix in targets:
        found = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if not found:
            raise ValueError(f"model.lora.target_modules: no module's name ends in {suffix!r}.")
        for name in found:
            if not isinstance(modules[name], nn.Linear) or modules[name] is head:
                kind = "the LM head" if modules[name] is head else type(modules[name]).__name__
                raise ValueError(
                    f"model.lora.target_modules: {name!r} is {kind}; LoRA adapts the linear "
                    "layers of the transformer blocks only."
                )
        names += found
    return sorted(set(names))


def add_adapters(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject peft's LoRA layers into ``model`` in place (on whatever device it is, the meta
    device included) and freeze everything else; returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(model, settings.target_modules)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return names


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter weight."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The Hugging Face name of a parameter of an adapted model (``.base_layer`` dropped)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def adapter_init(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """The full initial value of adapter weight ``name``, the same on every layout: A as peft
    draws it (uniform in +-1/sqrt(fan_in)) from a generator seeded by ``seed`` and the name,
    B zero (so training starts from the base model)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def adapter_scaling(model: nn.Module) -> float | None:
    """The update scale (alpha / rank) of ``model``'s LoRA layers; None without any."""
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict) and ADAPTER in module.scaling:
            return module.scaling[ADAPTER]
    return None


def merge_adapters(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """``state`` of an adapted model as the plain model's: each adapted weight becomes
    W + scaling * B @ A under its Hugging Face name; the adapters are dropped."""
    merged = {base_name(k): v for k, v in state.items() if not is_adapter(k)}
    for key in state:
        if f".lora_A.{ADAPTER}." in key:
            module = key.split(f".lora_A.{ADAPTER}.")[0]
            a, b = state[key], state[f"{module}.lora_B.{ADAPTER}.weight"]
            weight = merged[f"{module}.weight"]
            merged[f"{module}.weight"] = weight + (scaling * (b.double() @ a.double())).to(weight)
    return merged


def write_peft_adapter(
    state: dict[str, torch.Tensor], settings: LoraSettings, out: str, base: str | None
) -> None:
    """Write the adapters in ``state`` (a foundation's, trained names) as a PEFT adapter
    folder that ``PeftModel.from_pretrained(base_model, out)`` loads; ``base``: the base
    model's folder, recorded in ``adapter_config.json``."""
    from peft import LoraConfig

    tensors = {
        "base_model.model." + k.replace(f".{ADAPTER}.", "."): v.contiguous()
        for k, v in state.items()
        if is_adapter(k)
    }
    modules = sorted({k.split(".lora_")[0] for k in state if is_adapter(k)})
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=os.path.abspath(base) if base else None,
    )
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), {"format": "pt"})
