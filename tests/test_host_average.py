"""DDP's gradient average through shared memory against an all-gathered mean."""

import os

import pytest
import torch
import torch.distributed as dist

from omniweave.distributed.host_average import SharedMemoryAverage, shared_memory_fits
from tests.distributed import run_distributed


def _average_twice(numel: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Two rounds of averaging (the region is reused) of rank-dependent buffers; returns
    the last average, the mean of all ranks' buffers and the files left in shared memory."""
    group = dist.group.WORLD
    state = SharedMemoryAverage(group)
    for round_ in range(2):
        generator = torch.Generator().manual_seed(100 * round_ + dist.get_rank())
        buffer = torch.randn(numel, generator=generator)
        everyone = [torch.empty_like(buffer) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, buffer)
        state.average(0, buffer)
    mean = torch.stack(everyone).sum(0) / dist.get_world_size()
    prefix = os.path.basename(state.prefix)
    left = [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    return buffer, mean, left


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_average_is_the_mean_over_ranks(world):
    """Three ranks: a bucket that does not split evenly, a sum that is not a power of two."""
    results = run_distributed(_average_twice, world, 1001)
    for average, mean, left in results:
        torch.testing.assert_close(average, mean, rtol=1e-6, atol=1e-7)
        assert left == []  # unlinked once every rank mapped it
    torch.testing.assert_close(results[0][0], results[-1][0], rtol=0, atol=0)


def _fits(local_world: str) -> bool:
    os.environ["LOCAL_WORLD_SIZE"] = local_world
    model = torch.nn.Linear(4, 4)
    return shared_memory_fits(model, dist.group.WORLD, torch.device("cpu"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_shared_memory_only_where_every_rank_is_on_this_host():
    assert run_distributed(_fits, 2, "2") == [True, True]
    assert run_distributed(_fits, 2, "1") == [False, False]  # two hosts of one rank each
