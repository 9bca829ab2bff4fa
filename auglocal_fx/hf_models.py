"""Hugging Face transformers image classifiers by name: ``model.name: hf:<model type, config or hub id>``.

``hf:vit`` builds ``AutoModelForImageClassification`` from ``AutoConfig.for_model("vit", ...)``, with
random weights and no network; ``hf:path/to/config.json`` (or a folder holding one) from that config;
``hf:google/vit-base-patch16-224`` from the hub's config, with its weights when ``pretrained``. A
recipe's ``model.kwargs`` are config fields (``hidden_size: 192``); ``num_classes``, ``in_chans`` and
``img_size`` become ``num_labels``, ``num_channels`` and ``image_size``. The torch.export front end
traces what is built (``frontend: auto``). Needs ``pip install 'auglocal-fx[hf]'``.
"""

from __future__ import annotations

import difflib
import os

from torch import nn

from .errors import AugLocalError, first_line

__all__ = ["PREFIX", "create_hf_model"]

PREFIX = "hf:"
_RENAMED = {"num_classes": "num_labels", "in_chans": "num_channels", "img_size": "image_size"}


def create_hf_model(spec: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """The image classifier ``spec`` names (without ``hf:``), its config changed by ``kwargs``."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    except ImportError as exc:
        raise AugLocalError(f"model hf:{spec} needs Hugging Face transformers: pip install 'auglocal-fx[hf]'") from exc
    fields = {_RENAMED.get(k, k): v for k, v in kwargs.items() if v is not None}
    known = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if spec in known:
        config = transformers.AutoConfig.for_model(spec)
    elif os.path.exists(spec) or "/" in spec:  # a config file or folder, or a hub id (owner/name)
        try:
            config = transformers.AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise AugLocalError(f"no config for hf:{spec} ({first_line(exc, 160)}); give a model type such as "
                                "hf:vit, a config.json, or a hub id reachable from here") from exc
    else:
        close = difflib.get_close_matches(spec, list(known), n=5, cutoff=0.5)
        raise AugLocalError(f"unknown Hugging Face image classifier type {spec!r}: "
                            f"{'did you mean ' + ', '.join(close) + '?' if close else 'see transformers AutoModelForImageClassification'}")
    unknown = sorted(k for k in fields if not hasattr(config, k))
    if unknown:
        raise AugLocalError(f"{type(config).__name__} has no field {', '.join(unknown)}; model.kwargs of an hf: model "
                            f"are its config's fields (e.g. hidden_size, num_hidden_layers)")
    for k, v in fields.items():
        setattr(config, k, v)
    if config.model_type not in known:
        raise AugLocalError(f"hf:{spec} is a {config.model_type} model, which transformers has no image classifier "
                            "for; recipes train image classifiers")
    auto = transformers.AutoModelForImageClassification
    if not pretrained:
        return auto.from_config(config)
    if spec in known:
        raise AugLocalError(f"model.pretrained needs weights: hf:{spec} is a model type; name a hub id "
                            f"(hf:owner/name) or a folder holding weights")
    try:  # a classifier of another class count: the head starts fresh (ignore_mismatched_sizes)
        return auto.from_pretrained(spec, config=config, ignore_mismatched_sizes=True)
    except OSError as exc:
        raise AugLocalError(f"could not load the weights of hf:{spec} ({first_line(exc, 160)}); check the network "
                            "or the folder, or use random weights") from exc
