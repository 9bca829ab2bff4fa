"""Overlapped units (``overlap``): each block's forward issued before the previous unit's aux net,
backward and update. On the CPU the streams are a stand-in and the reordering itself is what is
tested: the same losses and the same weights as the plain step, also with the aux nets offloaded.
The two CUDA streams run on a GPU (tools/bench_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from auglocal_fx import AugLocalError, to_auglocal
from auglocal_fx.runtime.offload import AuxOffload
from auglocal_fx.runtime.overlap import overlapped_step
from auglocal_fx.testing.stand_ins import StreamsStandIn as Streams
from auglocal_fx.testing.stand_ins import TransfersStandIn as HostStandIn

from handwritten import cifar_resnet


def _net(recompute="none"):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(cifar_resnet(1), blocks=4, input_size=(3, 16, 16), recompute=recompute)


def _batches(n):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("recompute, offload", [("none", False), ("block", False), ("none", True)])
def test_overlapped_units_train_exactly_as_the_plain_step(recompute, offload):
    plain, over = _net(recompute), _net(recompute)
    opt_p = plain.unit_optimizers(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_o = over.unit_optimizers(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    off = AuxOffload(over.local_units(), opt_o, transfers=HostStandIn()) if offload else None
    streams = Streams()
    for x, y in _batches(3):
        out_p = plain.train().training_step(x, y, optimizer=opt_p)
        out_o = overlapped_step(over.train().local_units(), x, y, optimizer=opt_o, offload=off, streams=streams)
        assert out_p.local_losses + [out_p.loss] == out_o.local_losses + [out_o.loss]
    # block 0; then block k+1 on the other stream before unit k's rest on its own
    assert streams.order[:8] == [0, 1, 0, 2, 1, 3, 2, 3]
    if off is not None:
        off.settle()
    for (key, tp), (_, to) in zip(plain.state_dict().items(), over.state_dict().items()):
        torch.testing.assert_close(tp, to, rtol=0, atol=0, msg=key)


def test_overlap_is_refused_without_a_cuda_device():
    net = _net()
    x, y = _batches(1)[0]
    with pytest.raises(AugLocalError, match="overlap runs units on two CUDA streams, and the batch is on cpu") as exc:
        net.train().training_step(x, y, overlap=True)
    assert "\n" not in str(exc.value)
