"""reuse_freed_memory: freed large buffers stay resident and come back without page faults; False undoes it; commands
switch it on only when ESSM_REUSE_FREED_MEMORY asks."""

import json
import os
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


MMAPPED_AFTER_SWITCHING = """
import ctypes, json, torch
from modeling_essm.cpu_allocator import reuse_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def mmapped_mb_of_a_third_block(mb):
    '''MB that glibc gave an `mb` MB buffer as a mapping of its own (fresh pages) after two such were freed;
    counted by glibc itself, so that the page size (huge pages or not) does not matter.'''
    for _ in range(2):
        torch.ones(mb * 2**18).sum()
    before = libc.mallinfo2().hblkhd
    block = torch.ones(mb * 2**18)
    mmapped = (libc.mallinfo2().hblkhd - before) / 2**20
    del block
    return mmapped

result = {"adaptive": mmapped_mb_of_a_third_block(8)}
reuse_freed_memory()
reuse_freed_memory(False)
result["fixed"] = mmapped_mb_of_a_third_block(16)
print(json.dumps(result))
"""


@pytest.mark.skipif(not hasattr(_glibc(), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)")
def test_switching_off_leaves_glibc_threshold_fixed():
    # Under torch's own huge-page allocation (THP_MEM_ALLOC_ENABLE) glibc mapped every 8 MB buffer afresh: the
    # test measures glibc's defaults without it.
    environment = {name: value for name, value in os.environ.items() if name != "THP_MEM_ALLOC_ENABLE"}
    output = subprocess.run([sys.executable, "-c", MMAPPED_AFTER_SWITCHING], capture_output=True, text=True,
                            timeout=120, check=True, env=environment).stdout
    result = json.loads(output.splitlines()[-1])
    # glibc raises its mmap threshold to reuse freed blocks of up to 32 MB only until a threshold is set (see the
    # docstring): then it stays where the 8 MB blocks had raised it, and 16 MB blocks get mappings of their own.
    assert result["adaptive"] == 0 and result["fixed"] >= 16


@pytest.mark.parametrize("value, switched", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_commands_switch_the_setting_only_when_the_variable_asks(monkeypatch, value, switched):
    calls = []
    monkeypatch.setattr(cpu_allocator, "reuse_freed_memory", lambda: calls.append(True) or True)
    if value is None:
        monkeypatch.delenv(cpu_allocator.REQUEST_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cpu_allocator.REQUEST_VARIABLE, value)
    requested = cpu_allocator.reuse_freed_memory_requested()
    assert calls == []  # reading the request changes nothing: commands switch once their other checks pass
    assert cpu_allocator.reuse_freed_memory_in_command(requested) is switched
    assert calls == ([True] if switched else [])


@pytest.mark.parametrize("value", ["yes", "2", "true"])
def test_a_bad_request_is_refused_before_the_setting_changes(monkeypatch, value):
    calls = []
    monkeypatch.setattr(cpu_allocator, "reuse_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setenv(cpu_allocator.REQUEST_VARIABLE, value)
    message = rf"ESSM_REUSE_FREED_MEMORY must be 1 .* or 0 .*, got '{value}'"
    with pytest.raises(cpu_allocator.AllocatorRequestError, match=message):
        cpu_allocator.reuse_freed_memory_requested()
    assert calls == []
