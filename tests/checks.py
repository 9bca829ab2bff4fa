"""Invariant checks shared by the tests: eval parity, gradient isolation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from auglocal_fx.runtime.bundles import call

__all__ = ["assert_gradient_isolation", "fixed_batch_losses"]


def assert_gradient_isolation(net, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> None:
    """No parameter is trained by two losses, and each block's gradient in a joint ``training_step``
    equals the gradient of its own local loss alone (blocks before it run without a graph); the
    local loss is the rule's own where it brings one. ``loss_fn`` as ``training_step`` takes it."""
    loss_fn = loss_fn or F.cross_entropy
    net.train()
    state = copy.deepcopy(net.state_dict())
    net.zero_grad(set_to_none=True)
    net.training_step(x, y, loss_fn=loss_fn)
    k = len(net.blocks)
    groups = [net.block_parameters(i) + (list(net.aux[i].parameters()) if i < k - 1 else []) for i in range(k)]
    ids = [{id(p) for p in g} for g in groups]
    for i in range(k):
        for j in range(i + 1, k):
            assert not ids[i] & ids[j], f"blocks {i} and {j} share parameters"
    together = [[None if p.grad is None else p.grad.clone() for p in g] for g in groups]
    for i in range(k):
        net.load_state_dict(state)  # same batch-norm statistics as in the joint step
        net.zero_grad(set_to_none=True)
        h = x
        with torch.no_grad():
            for j in range(i):
                h = call(net.blocks[j], h)
        out = call(net.blocks[i], h)
        unit = net.local_units()[i]  # the rule's own loss where it has one, else cross-entropy
        loss, _ = unit.local_loss(call(unit.top, out), y, x, loss_fn)
        loss.backward()
        for p, g in zip(groups[i], together[i]):
            if g is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        others = [p for j in range(k) if j != i for p in groups[j]]
        assert all(p.grad is None for p in others), f"loss {i} leaked gradient into another block"


def fixed_batch_losses(net, x, y, loss_fn=None, steps: int = 30, lr: float = 1e-3) -> list[float]:
    """The final loss of each of ``steps`` AdamW steps of ``net`` on one batch (it should fall)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        losses.append(net.train().training_step(x, y, loss_fn=loss_fn).loss)
        opt.step()
    return losses
