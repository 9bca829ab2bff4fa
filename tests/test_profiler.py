"""analyze.profile_graph: fake-tensor profiling gives exactly the real run's shapes, FLOPs and saved bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from auglocal_fx.passes.profiler import profile_graph
from auglocal_fx.passes.trace import trace


def _meta(gm):
    return {n.name: (n.meta["shape"], n.meta["flops"], sorted(n.meta["saved"].values())) for n in gm.graph.nodes}


@pytest.mark.parametrize("name", ["resnet50", "vit_tiny_patch16_224", "convnext_atto", "root_residual"])
def test_fake_profile_equals_real(zoo, name):
    case = zoo(name)
    gm = trace(case.model)
    x = torch.randn(1, *case.input_size)
    profile_graph(gm, x, fake=False)
    real = _meta(gm)
    params = [p.clone() for p in case.model.parameters()]
    profile_graph(gm, x)
    assert _meta(gm) == real
    assert all(torch.equal(a, b) for a, b in zip(params, case.model.parameters()))  # real weights back
    assert all(not isinstance(p, torch._subclasses.FakeTensor) for p in gm.parameters())


def test_saved_bytes_leave_weights_out():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 512, bias=False))  # weight 128 KiB, input 256 B
    gm = trace(lin)
    profile_graph(gm, torch.randn(1, 64))
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    assert sum(node.meta["saved"].values()) == 64 * 4


class _DataDependent(nn.Module):
    """nonzero's output shape depends on the values: no fake kernel can say it, so the real run profiles."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        keep = torch.nonzero(x[0] > -1e9)  # all 8 positions
        return self.fc(x) * keep.shape[0]


def test_data_dependent_graph_falls_back_to_the_real_run():
    gm = trace(_DataDependent())
    out = profile_graph(gm, torch.randn(1, 8))
    assert not isinstance(out, torch._subclasses.FakeTensor)
    nz = next(n for n in gm.graph.nodes if n.target is torch.nonzero)
    assert nz.meta["shape"] == (8, 1)
