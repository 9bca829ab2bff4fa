"""One optimizer per local unit: each unit's update walks its own parameters only.

A block-wise step updates unit i right after unit i's backward. With one optimizer over the whole
net, each of those updates walks every parameter of the net (and skips those without a gradient):
K walks per step, and a CUDA graph of one unit's step could not hold its update. ``UnitOptimizers``
holds one torch optimizer per unit over that unit's parameters (foreach or fused where the device
has them), and looks like one optimizer to everything else: LR schedulers, ``GradScaler``,
checkpoints.

A parameter two units share (tied weights) belongs to neither: it goes into one more optimizer,
stepped after each unit that uses it, as the one-optimizer per-unit step does (one state, stepped
once per unit that gave it a gradient).

The state dict has the layout of one optimizer over ``order`` (the parameters in the net's order):
the same parameter indices, one parameter group per unit. A checkpoint written with one optimizer
(one group) loads too.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import AugLocalError

__all__ = ["UnitOptimizers", "fused_kwargs"]


def fused_kwargs(optimizer_cls: type, device: torch.device) -> dict:
    """``{"fused": True}`` where ``optimizer_cls`` has a fused implementation for ``device`` (CUDA:
    SGD, Adam, AdamW), else ``{}`` (torch's default: foreach on CUDA, a loop on the CPU)."""
    if device.type != "cuda":
        return {}
    import inspect

    return {"fused": True} if "fused" in inspect.signature(optimizer_cls).parameters else {}


class UnitOptimizers(torch.optim.Optimizer):
    """``factory(params)`` (a torch optimizer) for each unit's own parameters; ``step_unit(i)``
    steps unit i's and frees its gradients.

    ``units``: the local units in order (``net.local_units()``, or DDP-wrapped ones). ``order``: the
    parameters in the order one optimizer over them would hold them, which the state dict's indices
    follow (the trainer and ``net.unit_optimizers`` pass ``net.parameters()``; default: the units'
    own order).

    Example:
        >>> opt = net.unit_optimizers(torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> out = net.training_step(x, y, optimizer=opt); sched.step()
    """

    def __init__(self, units: Sequence[nn.Module], factory: Callable[[list], torch.optim.Optimizer],
                 order: Sequence[nn.Parameter] | None = None):
        unit_params = [[p for p in _unique(getattr(u, "module", u).parameters()) if p.requires_grad] for u in units]
        users: dict[int, list[int]] = {}
        for i, params in enumerate(unit_params):
            for p in params:
                users.setdefault(id(p), []).append(i)
        own = [[p for p in params if len(users[id(p)]) == 1] for params in unit_params]
        shared = [p for p in _unique(p for params in unit_params for p in params) if len(users[id(p)]) > 1]
        # a unit with no trainable parameter of its own (a parameter-free block) has no optimizer
        self.optimizers = [factory(params) if params else None for params in own]
        self.shared = factory(shared) if shared else None
        self._shares = [any(len(users[id(p)]) > 1 for p in params) for params in unit_params]
        everything = [o for o in [*self.optimizers, self.shared] if o is not None]
        if not everything:
            raise AugLocalError("UnitOptimizers: the units have no trainable parameters")
        params = [p for o in everything for g in o.param_groups for p in g["params"]]
        self._order = _unique(params if order is None else order)
        known = {id(p) for p in self._order}
        if any(id(p) not in known for p in params):
            raise AugLocalError("UnitOptimizers: some of the units' parameters are not in `order`; pass every "
                                "parameter the units train")
        self._ready = False
        super().__init__(self._order, dict(everything[0].defaults))
        self._ready = True
        # the units' groups themselves, so a scheduler's writes reach the optimizers that step
        self.param_groups = [g for o in everything for g in o.param_groups]
        self.state = ChainMap(*(o.state for o in everything))  # read-only view; each optimizer keeps its own

    # -- stepping ------------------------------------------------------------------------------
    def step_unit(self, i: int) -> None:
        """Step unit ``i``'s parameters (and the shared ones it used), then free their gradients."""
        self._opt_called = True  # what an LR scheduler checks to see the optimizer stepped
        for opt in (self.optimizers[i], self.shared if self._shares[i] else None):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure=None):
        """Step every unit (one update after a whole step, ``optimizer.per_unit: false``)."""
        if closure is not None:
            raise AugLocalError("UnitOptimizers.step takes no closure; step units with step_unit(i)")
        for opt in self._all():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._all():
            opt.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self._ready:  # Optimizer.__init__ adds a first group itself, replaced by the units' own
            raise AugLocalError("UnitOptimizers holds one group per unit; build it over the parameters to train")
        super().add_param_group(param_group)

    def _all(self) -> list[torch.optim.Optimizer]:
        return [o for o in [*self.optimizers, self.shared] if o is not None]

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """One optimizer's layout over ``order``: ``state`` by parameter index, one group per unit."""
        index = {id(p): i for i, p in enumerate(self._order)}
        state, groups = {}, []
        for opt in self._all():
            local = opt.state_dict()
            flat = [p for g in opt.param_groups for p in g["params"]]
            for k, v in local["state"].items():
                state[index[id(flat[k])]] = v
            for g, saved in zip(opt.param_groups, local["param_groups"]):
                lr = saved.get("lr")  # a float in the file, also where CUDA graphs hold it as a tensor
                groups.append({**saved, "params": [index[id(p)] for p in g["params"]],
                               **({"lr": float(lr)} if isinstance(lr, torch.Tensor) else {})})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ``state_dict()``'s layout, or one optimizer's over the same ``order`` (every unit's
        group then takes that optimizer's settings)."""
        groups = state_dict["param_groups"]
        mine = [g for o in self._all() for g in o.param_groups]
        trained = sum(len(g["params"]) for g in mine)
        saved = [i for g in groups for i in g["params"]]
        legacy = len(groups) == 1 and len(mine) > 1  # one optimizer over the whole net (or stage)
        fits = (len(saved) == len(self._order) and len(set(saved)) == len(saved)) if legacy else (
            len(groups) == len(mine) and [len(g["params"]) for g in groups] == [len(g["params"]) for g in mine])
        if not fits:
            raise AugLocalError(f"optimizer state of {len(groups)} parameter group(s) over {len(saved)} parameters does "
                                f"not fit these {len(mine)} units' optimizers over {trained}; resume with the recipe "
                                "(and conversion) the checkpoint was written with")
        index = {id(p): i for i, p in enumerate(self._order)}
        at = {id(g): k for k, g in enumerate(mine)}
        for opt in self._all():
            flat = [p for g in opt.param_groups for p in g["params"]]
            local = {id(p): k for k, p in enumerate(flat)}
            local_groups = [{**(groups[0] if legacy else groups[at[id(g)]]),
                             "params": [local[id(p)] for p in g["params"]]} for g in opt.param_groups]
            local_state = {k: state_dict["state"][index[id(p)]] for k, p in enumerate(flat)
                           if index[id(p)] in state_dict["state"]}
            opt.load_state_dict({"state": local_state, "param_groups": local_groups})
        # torch's load_state_dict puts new group dicts in place: the schedulers' view follows them
        self.param_groups = [g for o in self._all() for g in o.param_groups]
        self.state = ChainMap(*(o.state for o in self._all()))

    def __repr__(self) -> str:
        inner = type(self._all()[0]).__name__
        return f"UnitOptimizers({len(self.optimizers)} units x {inner}, {len(self._order)} parameters)"


def _unique(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
