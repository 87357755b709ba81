import platform
import resource

import pytest
import torch

from heron.core.allocator import retain_freed_memory

PAGES = 16_384  # a 64 MB tensor's 4 KB pages: over glibc's largest dynamic mmap threshold (32 MB)


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    assert retain_freed_memory()
    faulted_in = []
    for _ in range(16):
        before = _page_faults()
        torch.ones(PAGES * 1024)  # float32: 64 MB, freed at once
        faulted_in.append(_page_faults() - before > PAGES // 2)
    # glibc's default maps each afresh and faults all its pages in every time; kept, the memory is
    # reused (some fault in still: aligned requests may take a fresh place at the heap's top a few times)
    assert sum(faulted_in) <= 6, faulted_in


def test_other_c_libraries_are_left_alone(monkeypatch):
    retain_freed_memory.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    try:
        assert retain_freed_memory() is False
    finally:
        retain_freed_memory.cache_clear()
