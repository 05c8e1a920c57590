"""DDP's gradient average through shared memory, for CPU ranks that share one host.

gloo all-reduces over TCP on the loopback device, in a thread of its own that competes with
the backward for the cores. Here each rank copies its bucket into a shared-memory file, the
ranks meet at a barrier, each sums its own ``1 / world`` of every rank's copy into a shared
result, they meet again, and each copies the result back: three passes over memory and two
small barriers, in the rank's own thread.

DDP's default hook divides by the world size, then sums; this sums, then divides, which is
the same in float arithmetic when the world size is a power of two.
"""

# No ``from __future__ import annotations``: DDP checks the hook's return annotation object.
import os
import uuid

import torch
import torch.distributed as dist
from torch import nn

SHARED_MEMORY = "/dev/shm"


class SharedMemoryAverage:
    """State of the comm hook ``average_in_shared_memory``: the group and, per bucket, a
    region of ``world + 1`` bucket-sized slots (each rank's copy, then the average)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        name = [f"omniweave-{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, group=group, group_src=0)
        self.prefix = os.path.join(SHARED_MEMORY, name[0])
        self.regions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def region(self, index: int, numel: int, dtype: torch.dtype):
        """Bucket ``index``'s slots ``[world, numel]`` and result ``[numel]``, mapped by every
        rank; the file is unlinked once all have mapped it, so nothing outlives the job."""
        slots, result = self.regions.get(index, (None, None))
        if result is None or result.numel() != numel or result.dtype != dtype:
            path = f"{self.prefix}-{index}"
            whole = torch.from_file(path, shared=True, size=(self.world + 1) * numel, dtype=dtype)
            dist.barrier(group=self.group)
            if self.rank == 0:
                os.unlink(path)
            slots, result = whole[: self.world * numel].view(self.world, numel), whole[-numel:]
            self.regions[index] = slots, result
        return slots, result

    def average(self, index: int, buffer: torch.Tensor) -> None:
        """Replace ``buffer`` (this rank's bucket ``index``) by its average over the ranks."""
        slots, result = self.region(index, buffer.numel(), buffer.dtype)
        slots[self.rank].copy_(buffer)
        dist.barrier(group=self.group)
        start = buffer.numel() * self.rank // self.world
        end = buffer.numel() * (self.rank + 1) // self.world
        mine = result[start:end]
        torch.sum(slots[:, start:end], dim=0, out=mine)
        mine.div_(self.world)
        dist.barrier(group=self.group)
        buffer.copy_(result)


def average_in_shared_memory(
    state: SharedMemoryAverage, bucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: the bucket averaged through ``state``'s shared memory."""
    buffer = bucket.buffer()
    state.average(bucket.index(), buffer)
    done = torch.futures.Future()
    done.set_result(buffer)
    return done


def shared_memory_fits(model: nn.Module, group, device: torch.device) -> bool:
    """Whether DDP's average can go through shared memory: CPU ranks, all of the group on
    this host (torchrun's local world is the whole world), and room in ``/dev/shm`` for
    twice the ``world + 1`` copies of the gradients (a full tmpfs would crash the job)."""
    world = dist.get_world_size(group)
    one_host = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == world == dist.get_world_size()
    if device.type != "cpu" or not one_host or world < 2 or not os.path.isdir(SHARED_MEMORY):
        return False
    disk = os.statvfs(SHARED_MEMORY)
    return 2 * (world + 1) * gradient_bytes(model) <= disk.f_bavail * disk.f_frsize


def gradient_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
