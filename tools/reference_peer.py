"""The paper authors' own AugLocal (github.com/ChenxiangMA/AugLocal) as a peer row of the benchmarks.

Nothing of their code is in this repository: ``load_reference`` imports ``networks/resnet.py`` from
a checkout the user names (``--reference-dir DIR`` of ``bench_speed.py`` and ``bench_memory.py``),
and ``build_reference`` calls its ``resnet32`` / ``resnet110`` with the keywords their ``train.py``
passes for ``--rule AugLocal``. Only their CIFAR ResNets are offered (our ``resnet32_cifar`` and
``resnet110_cifar``); ``--size`` 32 or 96, as their aux nets assert.

Which of our configurations the row compares against: ``tail="reference"`` with ``blocks`` = the
layer count. For AugLocal their ``train.py`` sets ``local_module_num = K - d`` before building the
model (``run.sh``: K = 16, d = 3 for ResNet-32, so M = 13), and ``LocalResNet`` puts an aux net
after each of the first M - 1 layers (``configs.py``'s ``net_config[:M-1]``, one entry per layer),
so every module but the last is one layer and the last trains the last d + 1 layers with the
model's head. Our ``to_auglocal(model, blocks=16, aux_depth=3, pyramid=0.5, tail="reference")``
cuts the same 13 modules (``apply_tail`` merges the last d + 1 of 16 one-layer blocks); the
default ``tail="exact"`` keeps 16 blocks with 15 aux nets, a different and larger workload. The
uniform selections and pyramidal depths then agree aux net by aux net (ResNet-32 K=16 d=3 tau=0.5:
[5, 10, 15] ... [13, 15], depths 3 x 6 then 2 x 6). Their split is one layer per module whatever
K is, so it is ours only at K = L (16 for ResNet-32, 55 for ResNet-110, as in their ``run.sh``);
other K are refused. The benchmarks therefore build their auglocal row with ``tail="reference"``
when given ``--reference-dir``.

Where the two still differ: an aux net that skips a layer which doubles the width and halves the
resolution. Theirs builds the copied block wider (first 3x3 conv strided from the input's width,
a 1x1 conv shortcut); ours copies the block as it is and puts a 1x1 conv + BatchNorm adapter in
front of it, so ours has more aux parameters and FLOPs. ResNet-32 K=16 d=3 tau=0.5: theirs
1,978,514 parameters (aux nets 1,511,608), ours 2,125,970 (aux nets 1,659,064); the backbone is
466,906 in both. At depth 1 their aux head also has a BatchNorm1d before the linear layer.

Their step (``train.py``): ``zero_grad``, then ``model(img=x, target=y, ixx_1=0, ixy_1=1, ixx_2=0,
ixy_2=1)``, whose forward runs each local module's backward and detaches its output, then one
``optimizer.step()`` over all parameters. The loss weights matter: ``forward``'s own defaults are
0, so a call with ``img`` and ``target`` alone would scale every local loss by 0 (same time, zero
local gradients); ``train.py`` passes its argparse defaults, as ``step`` does. The benchmarks step
every row with the same optimizer (theirs is SGD with nesterov momentum and weight decay, a few
element-wise ops more per parameter).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auglocal_fx.errors import AugLocalError, first_line  # noqa: E402

__all__ = ["REPO", "ARCHS", "check_config", "load_reference", "build_reference", "step", "forward_flops",
           "param_counts"]

REPO = "ChenxiangMA/AugLocal"
ARCHS = {"resnet32_cifar": ("resnet32", 16), "resnet110_cifar": ("resnet110", 55)}  # ours -> theirs, layers L
SIZES = (32, 96)  # their AuxNetwork asserts image_size in [32, 96] (CIFAR/SVHN, STL-10)
LOSS_WEIGHTS = {"ixx_1": 0.0, "ixy_1": 1.0, "ixx_2": 0.0, "ixy_2": 1.0}  # train.py's argparse defaults
AUX_PREFIXES = ("aux_classifier", "decoder")  # their LocalResNet's aux modules: attribute names


def check_config(model_name: str, blocks: int, aux_depth: int, pyramid: float, size: int) -> None:
    """One-line refusal of a setting their code does not build, or builds with another split."""
    if model_name not in ARCHS:
        raise AugLocalError(f"--reference-dir: their code has {' and '.join(ARCHS)} only, not {model_name}")
    layers = ARCHS[model_name][1]
    if blocks != layers:  # their modules are one layer each but the last, whatever K is
        raise AugLocalError(f"--reference-dir: their split matches ours only at --blocks {layers} "
                            f"(one layer per module) for {model_name}, not {blocks}")
    if aux_depth < 1:  # their uniform selection divides by d
        raise AugLocalError(f"--reference-dir: their aux nets need --aux-depth 1 or more, not {aux_depth}")
    modules = blocks - aux_depth  # train.py: local_module_num = K - d
    if modules < 2 or (pyramid > 0 and modules == 2):  # their pyramid divides by M - 2
        raise AugLocalError(f"--reference-dir: --blocks {blocks} --aux-depth {aux_depth} leaves them {modules} "
                            f"module(s); they need K - d >= {3 if pyramid > 0 else 2}")
    if size not in SIZES:
        raise AugLocalError(f"--reference-dir: their aux nets take --size 32 or 96 only, not {size}")


def _forget_other_checkout(root: Path) -> None:
    """Drop a ``networks`` package imported from another directory, so this one is imported (a second
    ``--reference-dir`` in one process, as in the tests); one from ``root`` stays cached."""
    loaded = sys.modules.get("networks.resnet")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == root / "networks" / "resnet.py":
        return
    for name in [n for n in sys.modules if n == "networks" or n.startswith("networks.")]:
        del sys.modules[name]


def load_reference(directory) -> ModuleType:
    """Their ``networks.resnet``, imported from the checkout at ``directory``."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise AugLocalError(f"--reference-dir {directory}: no such directory; point it at a checkout of {REPO}")
    if not (root / "networks" / "resnet.py").is_file():
        raise AugLocalError(f"--reference-dir {directory}: no networks/resnet.py; point it at a checkout of {REPO}")
    _forget_other_checkout(root)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()  # a checkout written a moment ago (the tests') must be seen
    try:
        return importlib.import_module("networks.resnet")
    except Exception as exc:  # a package their code imports and this environment lacks, or broken code
        raise AugLocalError(f"--reference-dir {directory}: importing networks/resnet.py failed: "
                            f"{first_line(exc)}") from exc
    finally:  # their root also holds a top-level ``utils`` package: shadow nobody's afterwards
        sys.path.remove(str(root))


def build_reference(directory, model_name: str, blocks: int, aux_depth: int, pyramid: float, batch: int,
                    classes: int = 10, size: int = 32) -> torch.nn.Module:
    """Their ``LocalResNet`` for our ``model_name``, built as ``train.py`` builds it for ``--rule
    AugLocal --local_module_num {blocks} --aux_net_depth {aux_depth} [--pyramid --pyramid_coeff
    {pyramid}] --batch_size {batch}`` (their ``batch_size`` only sizes InfoPro's masks)."""
    check_config(model_name, blocks, aux_depth, pyramid, size)
    arch = ARCHS[model_name][0]
    make = getattr(load_reference(directory), arch, None)
    if make is None:
        raise AugLocalError(f"--reference-dir {directory}: networks/resnet.py has no {arch}(); "
                            f"point it at a checkout of {REPO}")
    # aux_net_config: train.py swaps in "unifSamp" for AugLocal (the constructor's default builds no aux net)
    return make(local_module_num=blocks - aux_depth, batch_size=batch, image_size=size, dataset="cifar10",
                class_num=classes, rule="AugLocal", aux_net_config="unifSamp", aux_net_depth=aux_depth,
                is_pyramid=pyramid > 0, paramid_coeff=pyramid)


def step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step as their ``train.py`` takes it: the forward runs every backward itself."""
    opt.zero_grad(set_to_none=True)
    net(img=x, target=y, **LOSS_WEIGHTS)
    opt.step()


def _is_aux(name: str) -> bool:
    """Whether a parameter or module path (``aux_classifier_0_0.head.0.conv1``) is in an aux net."""
    return name.startswith(AUX_PREFIXES)


def param_counts(net: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, aux nets' parameters)."""
    named = list(net.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if _is_aux(n))


def forward_flops(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(backbone, aux nets) forward FLOPs per sample, counted as our plans count them
    (``torch.utils.flop_counter``). Their forward in eval mode still runs every aux net, and no
    backward: one forward of both on two samples."""
    was_training, n = net.training, min(2, len(x))
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(img=x[:n], target=y[:n], **LOSS_WEIGHTS)
    finally:
        net.train(was_training)
    # keys are "LocalResNet.aux_classifier_0_0" and deeper: count each aux net once, at its top
    tops = {k: v for k, v in counter.get_flop_counts().items() if k.count(".") == 1}
    aux = sum(sum(ops.values()) for k, ops in tops.items() if _is_aux(k.split(".", 1)[1]))
    return (counter.get_total_flops() - aux) // n, aux // n
