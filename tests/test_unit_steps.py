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


def _tied_net():
    """A net whose first and last blocks share one parameter (a tied embedding / classifier)."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 6)
            self.layers = nn.Sequential(*(nn.Sequential(nn.Linear(6, 6), nn.ReLU()) for _ in range(3)))
            self.out = nn.Linear(6, 6)

        def forward(self, x):
            h = self.layers(torch.relu(self.stem(x)))
            return nn.functional.linear(h, self.stem.weight, self.out.bias)  # tied to the stem

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(Tied(), blocks=3, input_size=(6,))


@pytest.mark.parametrize("make", [_net, _tied_net], ids=["resnet", "tied"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unit_optimizers_make_the_updates_of_one_optimizer_stepped_per_unit(name, make):
    """Each unit's own optimizer (``net.unit_optimizers``): the same weights, optimizer state and
    learning rates as one optimizer over the whole net stepped after every unit, under a schedule."""
    a, b = make(), make()
    shape = (3, 16, 16) if make is _net else (6,)
    classes = 10 if make is _net else 6
    opt_a = OPTIMIZERS[name](a.parameters())
    ref = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))])  # the class and settings of the same entry
    opt_b = b.unit_optimizers(type(ref), **{k: v for k, v in ref.defaults.items()
                                            if k in ("lr", "momentum", "nesterov", "weight_decay")})
    assert len(opt_b.optimizers) == len(b.local_units())
    if make is _tied_net:  # the tied weight is in neither unit's own optimizer
        assert opt_b.shared is not None and len(opt_b.shared.param_groups[0]["params"]) == 1
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 1, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g)
        a.train().training_step(x, y, optimizer=opt_a)
        b.train().training_step(x, y, optimizer=opt_b)
        assert all(p.grad is None for p in b.parameters())
        sched_a.step()
        sched_b.step()
    assert [g["lr"] for g in opt_b.param_groups] == [opt_a.param_groups[0]["lr"]] * len(opt_b.param_groups)
    for (key, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=key)
    # the same state in the same indices as the one optimizer's (a checkpoint of either loads into the other)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in sa[k]:
            torch.testing.assert_close(sa[k][field], sb[k][field], rtol=0, atol=0)


def test_a_unit_step_walks_only_its_own_parameters():
    """What makes it lean: stepping unit i touches unit i's optimizer and no other."""
    net = _net()
    opt = net.unit_optimizers(torch.optim.SGD, lr=0.1)
    stepped = []
    for i, o in enumerate(opt.optimizers):
        o.register_step_post_hook(lambda *_, i=i: stepped.append(i))
    net.train().training_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), optimizer=opt)
    assert stepped == list(range(len(net.local_units())))


def test_unit_optimizers_resume_from_one_optimizers_checkpoint_and_their_own():
    """A run checkpointed with one optimizer (before per-unit optimizers) and one with per-unit ones
    both continue with the same updates as the unbroken run."""
    def make_opt(net):
        return net.unit_optimizers(torch.optim.SGD, lr=0.05, momentum=0.9)

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    # the unbroken run
    def decay(opt):
        return torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    ref = _net()
    opt = make_opt(ref)
    sched = decay(opt)
    for x, y in batches:
        ref.train().training_step(x, y, optimizer=opt)
        sched.step()
    for saved_by in ("one optimizer", "unit optimizers"):
        first = _net()
        opt1 = (torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9) if saved_by == "one optimizer"
                else make_opt(first))
        sched1 = decay(opt1)
        for x, y in batches[:2]:
            first.train().training_step(x, y, optimizer=opt1)
            sched1.step()
        second = _net()
        second.load_state_dict(first.state_dict())
        opt2 = make_opt(second)
        sched2 = decay(opt2)
        opt2.load_state_dict(opt1.state_dict())
        sched2.load_state_dict(sched1.state_dict())
        for x, y in batches[2:]:
            second.train().training_step(x, y, optimizer=opt2)
            sched2.step()  # reaches the units' optimizers after the load replaced their groups
        assert [g["lr"] for g in opt2.optimizers[0].param_groups] == [opt.param_groups[0]["lr"]]
        for (key, ta), (_, tb) in zip(ref.state_dict().items(), second.state_dict().items()):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=f"{saved_by}: {key}")


def test_unit_optimizers_refuse_state_of_another_net():
    net, other = _net(), _tied_net()
    with pytest.raises(AugLocalError, match="does not fit"):
        net.unit_optimizers(lr=0.1).load_state_dict(other.unit_optimizers(lr=0.1).state_dict())
