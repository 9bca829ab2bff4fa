"""Aux nets off the card (``offload: aux``): exact against the plain per-unit step, at most two aux
nets resident at a time, every aux head evaluated, refused in one line without a CUDA device. The
host <-> device copies run through a stand-in that copies between CPU tensors (so every swap of
storage is exercised); the CUDA streams and pinned memory run on a GPU (tools/bench_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from auglocal_fx import AugLocalError, to_auglocal
from auglocal_fx.runtime.offload import AuxOffload
from auglocal_fx.testing.stand_ins import TransfersStandIn as StandIn

from handwritten import cifar_resnet


def _net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(cifar_resnet(1), blocks=4, input_size=(3, 16, 16))


def _batches(n, size=8):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
              "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.05})}


def _resident(net, off) -> list[int]:
    """The aux nets whose weights are not in their host copies now."""
    return [k for k in range(len(net.aux)) if next(net.aux[k].parameters()).data_ptr() != off.host[k][0].data_ptr()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_offloaded_aux_nets_train_exactly_as_resident_ones(name):
    cls, kw = OPTIMIZERS[name]
    plain, moved = _net(), _net()
    opt_p, opt_m = plain.unit_optimizers(cls, **kw), moved.unit_optimizers(cls, **kw)
    off = AuxOffload(moved.local_units(), opt_m, transfers=StandIn())
    assert _resident(moved, off) == []  # all on the host until a step needs them
    seen = []
    for k, block in enumerate(moved.blocks):
        block.register_forward_pre_hook(lambda *_, k=k: seen.append((k, _resident(moved, off))))
    for x, y in _batches(3):
        out_p = plain.train().training_step(x, y, optimizer=opt_p)
        out_m = moved.train().training_step(x, y, optimizer=opt_m, offload=off)
        assert out_p.local_losses + [out_p.loss] == out_m.local_losses + [out_m.loss]
    # unit k runs with its own aux net and the next one in, no other
    assert seen[:4] == [(0, [0, 1]), (1, [1, 2]), (2, [2]), (3, [0])]
    off.synchronize()
    for (key, tp), (_, tm) in zip(plain.state_dict().items(), moved.state_dict().items()):
        torch.testing.assert_close(tp, tm, rtol=0, atol=0, msg=key)
    sp, sm = opt_p.state_dict()["state"], opt_m.state_dict()["state"]
    for k in sp:
        for field in sp[k]:
            torch.testing.assert_close(sp[k][field], sm[k][field], rtol=0, atol=0)


def test_every_aux_head_is_evaluated_with_the_aux_nets_resident():
    plain, moved = _net(), _net()
    opt_m = moved.unit_optimizers(torch.optim.SGD, lr=0.1)
    off = AuxOffload(moved.local_units(), opt_m, transfers=StandIn())
    x, _ = _batches(1)[0]
    with off.resident():
        assert _resident(moved, off) == list(range(len(moved.aux)))
        got = moved.eval().head_outputs(x)
    assert _resident(moved, off) == []
    for a, b in zip(plain.eval().head_outputs(x), got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_offload_is_refused_without_a_cuda_device_and_without_the_units_optimizers():
    net = _net()
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1)
    with pytest.raises(AugLocalError, match="offload: aux keeps the aux nets in host memory beside a CUDA device, "
                                            "and the net is on cpu") as exc:
        net.offload_aux(opt)
    assert "\n" not in str(exc.value)
    with pytest.raises(AugLocalError, match="pass the units' own optimizers"):
        AuxOffload(net.local_units(), torch.optim.SGD(net.parameters(), lr=0.1), transfers=StandIn())
    off = AuxOffload(net.local_units(), opt, transfers=StandIn())
    x, y = _batches(1)[0]
    with pytest.raises(AugLocalError, match="pass the optimizer the offload was made with"):
        net.train().training_step(x, y, offload=off)


def test_the_plans_estimate_counts_the_weights_a_step_holds_on_the_device():
    """``estimate_footprint(offload="aux")``'s weights against the bytes resident at each unit of a
    real step: the backbone and head, and the aux nets not in their host copies."""
    from auglocal_fx.costs import estimate_footprint

    net = _net()
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1, momentum=0.9)
    off = AuxOffload(net.local_units(), opt, transfers=StandIn())
    backbone = sum(p.numel() * p.element_size() for p in net.model.parameters())
    held = []

    def count(*_):
        held.append(backbone + sum(p.numel() * p.element_size() for k in _resident(net, off)
                                   for p in net.aux[k].parameters()))

    for block in net.blocks:
        block.register_forward_pre_hook(count)
    x, y = _batches(1)[0]
    net.train().training_step(x, y, optimizer=opt, offload=off)
    est = estimate_footprint(net.plan, 8, offload="aux")
    assert est.weights == max(held) < estimate_footprint(net.plan, 8).weights
    assert est.optimizer == est.weights  # SGD's momentum: one slot
