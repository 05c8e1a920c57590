"""Host memory on the CPU: freed activation memory stays with the process."""

import sys

import pytest

from omniweave.train.host_memory import keep_freed_host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_accepts_the_malloc_thresholds():
    assert keep_freed_host_memory()
