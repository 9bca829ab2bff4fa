"""Per-unit optimizer steps (``training_step(optimizer=...)``): each unit's parameters stepped right
after its backward, its gradients freed; the same training run as one step after the whole step."""

from __future__ import annotations

import warnings

import pytest
import torch

from auglocal_fx import AugLocalError, to_auglocal

from handwritten import cifar_resnet

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
}


def _net():
    torch.manual_seed(0)
    model = cifar_resnet(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(model, blocks=4, input_size=(3, 16, 16))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_per_unit_steps_equal_one_step_after_the_whole_step(name):
    a, b = _net(), _net()
    opt_a, opt_b = OPTIMIZERS[name](a.parameters()), OPTIMIZERS[name](b.parameters())
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 1, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        out_a = a.train().training_step(x, y)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        sched_a.step()
        out_b = b.train().training_step(x, y, optimizer=opt_b)
        assert all(p.grad is None for p in b.parameters())  # freed unit by unit
        sched_b.step()
        assert out_a.local_losses + [out_a.loss] == pytest.approx(out_b.local_losses + [out_b.loss], rel=1e-5)
    for (name_a, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name_a)


def test_at_most_one_units_gradients_are_alive():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    alive = []
    units = net.local_units()
    for unit in units:  # after each unit's forward, count the gradients already there
        unit.register_forward_hook(lambda *_: alive.append(sum(p.grad is not None for p in net.parameters())))
    net.train().training_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), units=units, optimizer=opt)
    assert alive == [0] * len(units)


def test_optimizer_with_a_scaler_is_refused():
    net = _net()
    with pytest.raises(AugLocalError, match="GradScaler steps once per update"):
        net.training_step(torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)),
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu"))
