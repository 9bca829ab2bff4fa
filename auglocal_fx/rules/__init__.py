"""Local-learning rules, one module each; importing the package registers them all.

- ``auglocal`` (:mod:`.auglocal`): aux nets copy uniformly selected downstream layers — the method.
- ``dgl`` (:mod:`.dgl`): pooled 1x1 convs and an MLP, cross-entropy — the DGL baseline.
- ``infopro`` (:mod:`.infopro`): a conv classifier and an image decoder, reconstruction + cross-entropy.
- ``predsim`` (:mod:`.predsim`): a conv matched to the labels' batch similarity + a linear prediction.
- ``bp`` (:mod:`.bp`): no aux nets, one block — plain backprop through the same code path.
"""

from . import auglocal, bp, dgl, infopro, predsim
from .rule import IMAGENET_MEAN, IMAGENET_STD, RULES, AuxContext, LocalLoss, Rule, get_rule, register_rule

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "RULES", "AuxContext", "LocalLoss", "Rule", "get_rule", "register_rule",
           "auglocal", "bp", "dgl", "infopro", "predsim"]
