"""CUDA graphs per unit (``net.capture``): refused clearly without a CUDA device; on the CPU its
bookkeeping (static batch, chained unit outputs, tensor learning rates under a schedule, warm-up,
eager batches of another shape) runs through a stand-in whose "replay" re-runs the recorded step, and
must train exactly as the eager per-unit step does. The graphs themselves run on a GPU
(tools/bench_gpu.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from auglocal_fx import AugLocalError, to_auglocal
from auglocal_fx.runtime.blockwise import blockwise_step
from auglocal_fx.runtime.graphs import CapturedStep
from auglocal_fx.testing.stand_ins import GraphsStandIn as StandIn

from handwritten import cifar_resnet


def _net():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(cifar_resnet(1), blocks=4, input_size=(3, 16, 16))


def _batches(sizes):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("clip, amp", [(None, None), (0.5, None), (None, torch.bfloat16)])
def test_captured_step_trains_exactly_as_the_eager_step(clip, amp):
    eager, graphed = _net(), _net()
    opt_e = eager.unit_optimizers(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_g = graphed.unit_optimizers(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for g in opt_e.param_groups:  # as a graph holds it: a float32 tensor (the update's only difference
        g["lr"] = torch.tensor(g["lr"])  # from a Python float's, its last bits)
    sched_e = torch.optim.lr_scheduler.CosineAnnealingLR(opt_e, T_max=8)
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=8)
    batches = _batches([8, 8, 8, 8, 4, 8, 8])  # a smaller batch among them runs eagerly
    notes = []
    backend = StandIn()
    step = CapturedStep(graphed.train().local_units(), opt_g, batches[0], clip_grad=clip, warmup=2,
                        log=notes.append, backend=backend, autocast_dtype=amp)
    for x, y in batches:
        out_e = blockwise_step(eager.train().local_units(), x, y, optimizer=opt_e, clip_grad=clip,
                               autocast_dtype=amp)
        out_g = step(x, y)
        assert out_g.loss.item() == out_e.loss and out_g.local_losses.tolist() == out_e.local_losses
        sched_e.step()
        sched_g.step()
    assert backend.captured == len(graphed.blocks)  # each unit captured once
    assert (step.eager_steps, step.replays) == (3, 4)  # two warm-up steps, the batch of 4; the rest replayed
    assert [n.split(":")[0] for n in notes] == ["cuda graphs", "cuda graphs"] and "runs eagerly" in notes[1]
    # the schedule reached the replayed steps through the learning rate held as a tensor
    assert isinstance(opt_g.param_groups[0]["lr"], torch.Tensor)
    assert opt_g.param_groups[0]["lr"].item() == opt_e.param_groups[0]["lr"].item() < 0.05
    for (key, te), (_, tg) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        torch.testing.assert_close(te, tg, rtol=0, atol=0, msg=key)
    # a checkpoint's learning rate is a number, whichever way the run held it
    assert all(isinstance(g["lr"], float) for g in opt_g.state_dict()["param_groups"])


def test_capture_without_a_cuda_device_is_refused_in_one_line():
    net = _net()
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1)
    with pytest.raises(AugLocalError, match=r"cuda graphs need a CUDA device, and the batch is on cpu") as exc:
        net.capture(_batches([2])[0], opt)
    assert "\n" not in str(exc.value)


def test_capture_needs_the_units_own_optimizers():
    net = _net()
    with pytest.raises(AugLocalError, match="net.unit_optimizers"):
        CapturedStep(net.local_units(), torch.optim.SGD(net.parameters(), lr=0.1), _batches([2])[0],
                     backend=StandIn())


def test_a_unit_that_cannot_be_captured_is_named():
    net = _net()
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1)
    step = CapturedStep(net.train().local_units(), opt, _batches([2])[0], warmup=1, backend=StandIn(fail_at=2),
                        log=lambda _: None)
    x, y = _batches([2])[0]
    step(x, y)  # the warm-up step
    with pytest.raises(AugLocalError, match=r"unit 2 \(block 2 and its aux net\) cannot be captured: "
                                            r"RuntimeError: operation not permitted") as exc:
        step(x, y)
    assert "\n" not in str(exc.value)
