"""reuse_freed_memory: a freed large buffer is reused without new page faults, and the default comes back."""

import json
import subprocess
import sys

import pytest

from modeling_essm.cpu_allocator import _glibc

# Run in a fresh interpreter: the setting is process-wide and must not leak into the test session.
FAULTS_PER_REALLOCATION = """
import json, resource, sys, torch
from modeling_essm.cpu_allocator import reuse_freed_memory

def minor_faults_of_a_reallocation():
    torch.ones(16 * 2**20).sum()  # 64 MB, allocated, touched and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

counts = {"default": minor_faults_of_a_reallocation()}
counts["applied"] = reuse_freed_memory()
counts["reuse"] = minor_faults_of_a_reallocation()
reuse_freed_memory(False)
counts["restored"] = minor_faults_of_a_reallocation()
print(json.dumps(counts))
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator setting exists only with glibc")
def test_freed_memory_is_reused_without_page_faults_and_the_default_returns():
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION], capture_output=True, text=True,
                            timeout=120, check=True)
    counts = json.loads(result.stdout.splitlines()[-1])
    pages = 64 * 2**20 // 4096  # 16384 pages of 4 kB: a fresh mapping faults in (nearly) every one
    assert counts["applied"] is True
    assert counts["default"] > pages // 2
    assert counts["reuse"] < pages // 20
    assert counts["restored"] > pages // 2
