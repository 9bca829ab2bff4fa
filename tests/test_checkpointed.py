"""checkpointed(): backprop with activation checkpointing at the plan's K block boundaries, the
baseline a user would pick instead of local learning to save memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from auglocal_fx.checkpointed import checkpointed
from auglocal_fx.costs import bp_footprint, checkpointed_footprint
from auglocal_fx.runtime.memory import SavedTensorMeter

from handwritten import cifar_resnet


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return cifar_resnet(n=3)


def test_same_logits_and_gradients_as_the_model_with_less_saved_in_the_forward():
    model, ref = _model(), _model()
    ck = checkpointed(model, 6, input_size=[3, 32, 32], batch=8)
    assert len(ck.blocks) == 6 and sum(p.numel() for p in ck.parameters()) == sum(p.numel() for p in ref.parameters())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    ck.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(ck(x), ref(x))  # eval: the model's own computation
    ck.train(), ref.train()
    with SavedTensorMeter(exclude=ck.parameters()) as meter:  # sees what is saved outside the checkpoints
        F.cross_entropy(ck(x), y).backward()
    with SavedTensorMeter(exclude=ref.parameters()) as full:
        F.cross_entropy(ref(x), y).backward()
    assert meter.peak < full.peak / 2
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):  # batch-norm updated once, not twice
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_estimate_holds_the_boundaries_and_one_block():
    ck = checkpointed(_model(), 6, input_size=[3, 32, 32], batch=8)
    plan = ck.plan
    bp, est = bp_footprint(plan, 8), checkpointed_footprint(plan, 8)
    assert (est.weights, est.gradients, est.optimizer) == (bp.weights, bp.gradients, bp.optimizer)
    largest = max(plan.block_act_bytes(b) for b in plan.blocks)
    assert 8 * largest <= est.activations < bp.activations


def test_compile_compiles_each_block_under_its_checkpoint():
    model, ref = _model(), _model()
    ck = checkpointed(model, 4, input_size=[3, 32, 32], batch=4)
    from torch._dynamo.utils import counters

    ck.compile(backend="aot_eager")  # torch.compile(ck) whole cannot trace the checkpoint's context_fn
    before = counters["stats"]["unique_graphs"]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ck.train(), ref.train()
    ck.training_step(x, y)
    assert counters["stats"]["unique_graphs"] - before == len(ck.blocks) + 1  # every block and the head compiled
    F.cross_entropy(ref(x), y).backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):  # batch-norm updated once, compiled too
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
