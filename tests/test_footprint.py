"""Memory of a whole training step: the plan's estimate (weights, gradients, optimizer state,
activations), the memory balance that minimises it, and the two options that lower it
(``recompute="block"``, ``aux_dtype="bfloat16"``) — each exact where it must be."""

from __future__ import annotations

import io
import itertools
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from auglocal_fx import AugLocalError, load_auglocal, to_auglocal
from auglocal_fx.costs import bp_footprint, crossover_batch, estimate_footprint, memory_summary
from auglocal_fx.passes.partition import min_total_partition
from auglocal_fx.plan import Plan
from auglocal_fx.runtime.memory import SavedTensorMeter, allocated_peak

from handwritten import cifar_resnet

SIZE = (3, 16, 16)


def _net(**kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_auglocal(cifar_resnet(2), blocks=kw.pop("blocks", 6), input_size=SIZE, **kw)


def _batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- the partition that minimises sum(held) + max(running) ----------------------------------------
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_min_total_partition_is_optimal(data):
    n = data.draw(st.integers(1, 7))
    k = data.draw(st.integers(1, n))
    table = data.draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=k * n * n,
                               max_size=k * n * n))
    unit = lambda j, s, e: table[(j * n + s) * n + e]  # noqa: E731

    def cost(blocks):
        figs = [unit(j, b[0], b[-1]) for j, b in enumerate(blocks)]
        return sum(h for h, _ in figs) + max(r for _, r in figs)

    blocks = min_total_partition(n, k, unit)
    assert [x for b in blocks for x in b] == list(range(n)) and len(blocks) == k and all(blocks)
    best = min(cost([list(range(a, b)) for a, b in zip((0, *cuts), (*cuts, n))])
               for cuts in itertools.combinations(range(1, n), k - 1))
    assert cost(blocks) == best


def test_memory_balance_lowers_the_estimated_total():
    equal, memory = _net(), _net(balance="memory")
    assert estimate_footprint(memory.plan).total <= estimate_footprint(equal.plan).total
    # at a huge batch the activations decide: the balance then matches the activation-only one
    big = _net(balance="memory", batch=100_000)
    assert max(u.act_per_sample for u in estimate_footprint(big.plan).units) <= \
        max(u.act_per_sample for u in estimate_footprint(equal.plan).units)


# -- the estimate ----------------------------------------------------------------------------------
def test_estimate_adds_up_and_per_unit_steps_hold_one_units_gradients():
    plan = _net().plan
    f = estimate_footprint(plan, 16)
    assert f.total == f.weights + f.gradients + f.optimizer + f.activations
    assert f.weights == f.optimizer == sum(u.weights for u in f.units)  # SGD momentum: one slot
    assert f.gradients == max(u.gradients for u in f.units)
    assert estimate_footprint(plan, 16, per_unit_steps=False).gradients == f.weights
    assert estimate_footprint(plan, 16, optimizer_slots=2).optimizer == 2 * f.weights  # Adam
    assert f.activations == 16 * max(u.act_per_sample for u in f.units)
    n_params = sum(p.numel() for p in _net().parameters())
    assert f.weights == 4 * n_params  # built aux nets: their exact parameter counts


def test_crossover_batch_is_where_the_totals_cross():
    plan = _net().plan
    c = crossover_batch(plan)
    assert c is not None
    below = lambda b: estimate_footprint(plan, b).total < bp_footprint(plan, b).total  # noqa: E731
    assert below(c) and (c == 1 or not below(c - 1))


def test_estimate_matches_the_measured_activation_peak():
    net = _net().train()
    x, y = _batch(8)
    with SavedTensorMeter(exclude=net.parameters()) as meter:
        net.training_step(x, y)
    estimate = estimate_footprint(net.plan, 8).activations
    assert abs(estimate - meter.peak) <= 0.1 * meter.peak, (estimate, meter.peak)  # resnet50: 2% (test_net)


def test_plan_json_and_table_carry_the_footprint():
    plan = _net().plan
    memory = memory_summary(plan)
    d = json.loads(plan.to_json(memory))
    m = d["memory"]
    assert m["batch"] == 32 and len(m["units"]) == len(plan.blocks)
    assert set(m["units"][0]) >= {"weights", "gradients", "optimizer", "act_per_sample"}
    assert m["total"]["total"] == estimate_footprint(plan).total and m["bp_total"] == bp_footprint(plan).total
    assert Plan.from_dict(d) == plan  # derived: ignored on the way back
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(plan.table(memory, wide=True))
    text = console.export_text()
    assert "w+g+opt MiB" in text and "Estimated peak of a training step at batch 32" in text


# -- recompute ------------------------------------------------------------------------------------
def _train(net, steps=3, **kw):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = _batch(8, seed=i)
        out = net.train().training_step(x, y, optimizer=opt, **kw)
        losses += out.local_losses + [out.loss]
    return losses


@pytest.mark.parametrize("recompute", ["block", "aux"])
def test_recompute_trains_exactly_as_without(recompute):
    """Same losses, weights and batch-norm running statistics (updated once per step, not twice)."""
    a, b = _net(), _net(recompute=recompute)
    assert b.recompute == recompute == b.plan.config.recompute
    la, lb = _train(a), _train(b)
    assert la == pytest.approx(lb, rel=1e-5)
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_block_lowers_the_allocator_peak():
    """Measured in the allocator (checkpoint's recomputed tensors bypass saved-tensor hooks): on
    ResNet-32 K=16 a block's and its aux net's activations no longer add up; recomputing the aux
    net alone changes nothing, the block's activations wait for the aux net's backward anyway."""
    peaks = {}
    for recompute in ("none", "block", "aux"):
        torch.manual_seed(0)
        net = to_auglocal(cifar_resnet(5), blocks=16, input_size=(3, 32, 32), recompute=recompute).train()
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net.training_step(x, y, optimizer=opt)  # momentum buffers exist from here on
        peaks[recompute] = allocated_peak(lambda: net.training_step(x, y, optimizer=opt))  # noqa: B023
    assert peaks["block"] < 0.9 * peaks["none"], peaks
    assert abs(peaks["aux"] - peaks["none"]) < 0.03 * peaks["none"], peaks


# -- aux nets in bfloat16 --------------------------------------------------------------------------
def test_bf16_aux_nets_hold_half_the_bytes_and_train(tmp_path):
    net = _net(aux_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in net.aux_parameters())
    assert all(p.dtype == torch.float32 for p in net.backbone().parameters())
    before = [p.detach().clone() for p in net.backbone().parameters()]
    losses = _train(net, steps=2)
    assert torch.isfinite(torch.tensor(losses)).all()
    assert all(not torch.equal(a, p) for a, p in zip(before, net.backbone().parameters()))  # blocks learn
    outs = net.eval().head_outputs(_batch(2)[0])
    assert all(o.dtype == torch.float32 for o in outs)
    f32, bf16 = estimate_footprint(_net().plan), estimate_footprint(net.plan)
    aux_bytes = 4 * sum(p.numel() for p in net.aux_parameters())
    assert f32.weights - bf16.weights == aux_bytes // 2
    net.save(tmp_path / "n.pt")
    back = load_auglocal(tmp_path / "n.pt", model=cifar_resnet(2))
    assert back.plan.config.aux_dtype == "bfloat16"
    for pa, pb in zip(net.aux_parameters(), back.aux_parameters()):
        assert pb.dtype == torch.bfloat16 and torch.equal(pa, pb)


@pytest.mark.parametrize("kw, match", [
    ({"recompute": "all"}, "recompute='all' is not a recompute option; choose one of none, block, aux"),
    ({"aux_dtype": "float16"}, "aux_dtype='float16' is not an aux dtype; choose one of float32, bfloat16"),
    ({"batch": 0}, "batch=0 is not a batch size: give an integer >= 1"),
])
def test_bad_memory_options_raise_one_line(kw, match):
    with pytest.raises(AugLocalError, match=match):
        _net(**kw)
