"""Plans are data: module/parameter names matched by globs, mapped to placements.

In a glob, ``*`` stands for exactly one dotted name component
(``model.layers.*`` matches ``model.layers.3`` but not ``model.layers.3.mlp``).
"""

from __future__ import annotations

import re
from functools import cache

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, distribute_tensor


@cache
def _pattern(glob: str) -> re.Pattern:
    return re.compile(
        "\\.".join("[^.]+" if part == "*" else re.escape(part) for part in glob.split("."))
    )


def matches(name: str, glob: str) -> bool:
    """Whether the dotted ``name`` matches ``glob`` component by component."""
    return _pattern(glob).fullmatch(name) is not None


def shard_parameters(model: nn.Module, plan: dict[str, Placement], mesh: DeviceMesh) -> list[str]:
    """Turn each parameter whose name matches a glob of ``plan`` into a DTensor with that
    placement on ``mesh`` (works on the meta device). Returns the names it sharded."""
    sharded = []
    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{param_name}".lstrip(".")
            placement = next((p for glob, p in plan.items() if matches(name, glob)), None)
            if placement is not None:
                dtensor = distribute_tensor(param.data, mesh, [placement])
                module.register_parameter(param_name, nn.Parameter(dtensor, param.requires_grad))
                sharded.append(name)
    return sharded
