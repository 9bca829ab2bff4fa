"""Local-learning rules, one module each; importing the package registers them all.

- ``auglocal`` (:mod:`.auglocal`): aux nets copy uniformly selected downstream layers — the method.
- ``dgl`` (:mod:`.dgl`): a small aux head independent of later layers — the DGL baseline.
- ``bp`` (:mod:`.bp`): no aux nets, one block — plain backprop through the same code path.
"""

from . import auglocal, bp, dgl
from .rule import RULES, AuxContext, Rule, get_rule, register_rule

__all__ = ["RULES", "AuxContext", "Rule", "get_rule", "register_rule", "auglocal", "bp", "dgl"]
