"""reuse_freed_memory: freed large buffers stay resident and come back without page faults; False undoes it."""

import json
import subprocess
import sys

import pytest

from modeling_essm import cpu_allocator
from modeling_essm.cpu_allocator import _glibc

# Run in a fresh interpreter: the setting is process-wide and must not leak into the test session.
ALLOCATE_AND_FREE = """
import json, resource, torch
from modeling_essm.cpu_allocator import reuse_freed_memory

def resident_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024

def allocate_and_free():
    '''(MB still resident after a 64 MB buffer is freed, page faults of allocating it again and touching it).'''
    before = resident_mb()
    torch.ones(16 * 2**20).sum()
    retained = resident_mb() - before
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
    return retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

result = {"default": allocate_and_free(), "applied": reuse_freed_memory()}
result["reuse"] = allocate_and_free()
result["undone"] = reuse_freed_memory(False)
result["restored"] = allocate_and_free()
print(json.dumps(result))
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator setting exists only with glibc")
def test_freed_memory_is_kept_and_reused_until_switched_off():
    output = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE], capture_output=True, text=True,
                            timeout=120, check=True).stdout
    result = json.loads(output.splitlines()[-1])
    assert result["applied"] is True and result["undone"] is True
    (default_retained, _), (reuse_retained, reuse_faults), (restored_retained, _) = (
        result["default"], result["reuse"], result["restored"])
    assert default_retained < 16  # glibc's default: a 64 MB block is its own mapping, unmapped on free
    assert reuse_retained > 48  # kept on the heap for the next allocation ...
    assert reuse_faults < 200  # ... which then needs no fresh pages (16384 pages of 4 kB in 64 MB)
    assert restored_retained < 16


@pytest.mark.parametrize("value, switched", [(None, True), ("1", True), ("0", False)])
def test_commands_switch_the_setting_unless_the_variable_opts_out(monkeypatch, value, switched):
    calls = []
    monkeypatch.setattr(cpu_allocator, "reuse_freed_memory", lambda: calls.append(True) or True)
    if value is None:
        monkeypatch.delenv(cpu_allocator.OPT_OUT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cpu_allocator.OPT_OUT_VARIABLE, value)
    assert cpu_allocator.reuse_freed_memory_in_command() is switched
    assert calls == ([True] if switched else [])
