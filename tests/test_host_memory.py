"""Host memory kept between steps: with glibc's thresholds raised a step reuses what the last one freed
(no page faults in the steady state), with the defaults it faults its large activations in every step."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# a conv net whose activations (16 x 32 x 160 x 160 floats: 52 MiB) are above glibc's largest dynamic
# mmap threshold (32 MiB), so with the defaults every step maps them anew; minor faults per step
_CHILD = """
import json, resource, sys, torch
from auglocal_fx.runtime.host_memory import keep_freed_host_memory
torch.set_num_threads(1)
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
x = torch.randn(16, 3, 160, 160)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_kept_memory_is_reused_by_the_next_steps_instead_of_faulted_in_again():
    kept, released = _faults("keep"), _faults("release")
    assert kept["kept"] and not released["kept"]
    # the first steps grow the heap; glibc's aligned allocations still take a new block now and then
    steady, mapped = sum(kept["faults"][-5:]), sum(released["faults"][-5:])
    # a 52 MiB activation mapped anew is 13,000 faults of 4 KiB; every released step takes several
    assert min(released["faults"][-5:]) > 13_000
    assert steady < mapped / 10
