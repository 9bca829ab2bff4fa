"""Run every local unit (block + aux net, last block + head) once on fake tensors.

At conversion this turns a shape problem in a synthesized aux net into a one-line error there,
instead of a RuntimeError deep inside the first training step; before the first step at another
input size than the plan's, it tells whether the net can train at that size. Fake tensors
(``FakeTensorMode``) propagate shapes without computing or allocating anything; aux nets a lazy
conversion left on the meta device run on fake stand-ins of their weights, so every unit is checked
in every process, whichever units it builds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import AugLocalError, first_line
from ..modes import eval_mode
from ..runtime.bundles import call, detach

__all__ = ["check_units", "on_meta"]


def check_units(net: nn.Module, sizes=None, batch: int = 2) -> None:
    """Raise a one-line ``AugLocalError`` naming the first unit whose forward fails on inputs of
    per-sample shapes ``sizes`` (one per model input; default: the planned ones), or (at the
    planned size) whose logits differ in shape from the model's head's. Runs on fake tensors; a
    model with an op fake tensors cannot run (no meta kernel, data-dependent shapes) is run for
    real instead, at batch ``batch``, without gradients. Each input has its planned dtype
    (``PlanConfig.input_specs``: token ids are "int64")."""
    specs = net.plan.config.input_specs()
    sizes = [s for s, _ in specs] if sizes is None else [tuple(s) for s in sizes]
    examples = tuple(torch.zeros(batch, *s, dtype=getattr(torch, d)) for s, (_, d) in zip(sizes, specs))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake, _fake_meta(net, fake):
            _run_units(net, tuple(fake.from_tensor(x) for x in examples), sizes[0])
        return
    except AugLocalError:
        pass  # a shape problem, or an op fake tensors cannot run: the real run tells which
    _run_units(net, examples, sizes[0])


@contextmanager
def _fake_meta(net: nn.Module, mode: FakeTensorMode):
    """While the units run on fake tensors, every parameter and buffer on the meta device is a fake
    tensor on the device the rest of the net is on (tied ones stay tied); put back afterwards."""
    real = next((t for t in [*net.parameters(), *net.buffers()] if t.device.type != "meta"), None)
    device = real.device if real is not None else torch.device("cpu")
    swapped, fakes = [], {}
    for module in net.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.device.type == "meta":
                    if id(t) not in fakes:
                        with mode:
                            fakes[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
                    swapped.append((store, name, t))
                    store[name] = fakes[id(t)]
    try:
        yield
    finally:
        for store, name, t in swapped:
            store[name] = t


def _run_units(net: nn.Module, xs: tuple[torch.Tensor, ...], size: tuple) -> None:
    h = xs[0] if len(xs) == 1 else xs
    planned = tuple(net.plan.config.input_size)
    want = (xs[0].shape[0], *net.plan.head.out_shape)  # what the model's head gives (a dense map for a U-Net)
    units = net.local_units()
    with eval_mode(net), torch.no_grad():
        for i, unit in enumerate(units):
            what = f"block {i}" if i == len(units) - 1 else f"block {i} or its aux net"
            if on_meta(unit.top):  # the real run (fake tensors could not run the model): the block only
                h = detach(call(unit.block, h))
                continue
            try:
                out, top = call(unit, h)
                logits = unit.logits(top)
            except Exception as exc:  # any op may refuse a shape: report it as the user's size problem
                raise AugLocalError(_message(what, size, planned, first_line(exc, 200))) from exc
            if isinstance(logits, torch.Tensor) and size == planned and tuple(logits.shape) != want:
                raise AugLocalError(_message(what, size, planned, f"it gives logits of shape "
                                             f"{tuple(logits.shape)}, not {want} as the model's head"))
            h = detach(out)


def on_meta(module: nn.Module) -> bool:
    """Whether any of ``module``'s parameters or buffers is on the meta device (not built here)."""
    return any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


def _message(what: str, size: tuple, planned: tuple, why: str) -> str:
    at = "x".join(map(str, size))
    if size != planned:
        return (f"the net was planned for input {'x'.join(map(str, planned))} and cannot run at {at} ({what}: "
                f"{why}); convert it at the size you train at (input_size=...)")
    return f"{what} fails at input {at}: {why}; please report this with the model"
