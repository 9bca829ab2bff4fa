"""Hugging Face transformers architectures for the zoo check: every image classifier, sequence
classifier and causal LM that transformers ships, each built from a tiny random config.

transformers ships no small config per architecture (its tests hold them, not the package), so
:func:`tiny_config` shrinks the default one by the field names configs share: at most two layers
(two blocks per stage), four attention heads of 16 channels, a 64-wide hidden state, 128-wide
feed-forward layers, four experts, a 512-token vocabulary and 64-pixel images. Each rule applies only
where the config has the field, and sub-configs (a CLIP classifier's vision config) shrink alike. A
config the rules break is a failure of stage "create" with the model's own error. Mixture-of-experts
layers run transformers' ``batched_mm`` experts (its default on CPU, ``grouped_mm``, is a custom
operator the ONNX exporters cannot translate).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TASKS", "architectures", "tiny_config", "create_case", "next_token_loss", "logits"]

# task -> the mapping of model type to class name in transformers.models.auto.modeling_auto
TASKS = {"image": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
         "sequence": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
         "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}
LAYERS, HEADS, HEAD_DIM, HIDDEN, FFN, EXPERTS, VOCAB, IMAGE, TOKENS = 2, 4, 16, 64, 128, 4, 512, 64, 16
NUM_LABELS = 3


def _modeling_auto():
    from transformers.models.auto import modeling_auto
    return modeling_auto


def _registered() -> dict[str, tuple[list[str], str]]:
    """Class name -> (every model type it is registered for, its task)."""
    auto = _modeling_auto()
    out: dict[str, tuple[list[str], str]] = {}
    for task, mapping in TASKS.items():
        for model_type, names in getattr(auto, mapping).items():
            for name in (names,) if isinstance(names, str) else names:
                out.setdefault(name, ([], task))[0].append(model_type)
    return out


def _config_names() -> dict[str, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    return CONFIG_MAPPING_NAMES


def _own_type(name: str, types: list[str]) -> str:
    """Of the model types a class serves (LlamaForCausalLM: exaone, internlm3, llama ...), the one whose
    config class shares the longest prefix with the class's name, then whose own name does (GPT-2's
    classes serve gpt2 and gpt-sw3, both with GPT2Config)."""
    configs, lower = _config_names(), name.lower()

    def prefix(text: str) -> int:
        return len(os.path.commonprefix([text.lower().replace("_", "").replace("-", ""), lower]))
    return max(types, key=lambda t: (prefix(configs.get(t, "")), prefix(t)))


def architectures(pattern: str | None = None) -> dict[str, tuple[str, str]]:
    """Every architecture of the three tasks: class name -> (its model type, task); ``pattern`` (a
    glob) keeps the classes or model types it matches."""
    out = {}
    for name, (types, task) in _registered().items():
        own = _own_type(name, types)
        if not pattern or fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(own, pattern):
            out[name] = (own, task)
    return dict(sorted(out.items()))


# field-name rules, applied to every integer field (a field an alias names, e.g. GPT-2's n_layer, too)
_DEPTH = re.compile(r"(^|_)(num_)?(hidden_|encoder_|decoder_|text_|vision_)?layers$|^n_layers?$|^num_decoder_layers$")
_HEADS = re.compile(r"^(num_attention_heads|n_head|n_heads|num_heads|encoder_attention_heads|decoder_attention_heads)$")
_WIDTH = re.compile(r"^(hidden_size|d_model|n_embd|embed_dim|dim)$")
_FFN = re.compile(r"intermediate_size$|ffn_dim$|^d_ff$|^n_inner$|^ffn_hidden_size$")
_HEAD_DIMS = re.compile(r"head_dim$|^d_kv$|^attention_head_size$|^rotary_dim$")
_EXPERTS = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$")


def _shrink_int(key: str, v: int, heads_before: int | None, image: int | None) -> int | None:
    """The tiny value of integer field ``key`` (None: leave it)."""
    if _DEPTH.search(key) and "kernel" not in key:
        return min(v, LAYERS)
    if _HEADS.match(key):
        return min(v, HEADS)
    if key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
        return min(v, HEADS) if heads_before is None or v >= heads_before else min(v, HEADS // 2)
    if _WIDTH.match(key):
        return min(v, HIDDEN)
    if _FFN.search(key):
        return min(v, FFN if not key.startswith(("moe", "shared")) else FFN // 2)
    if _HEAD_DIMS.search(key):
        return min(v, HEAD_DIM)
    if _EXPERTS.match(key):
        return min(v, EXPERTS)
    if key == "num_experts_per_tok":
        return min(v, 2)
    if key in ("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace"):
        return min(v, 1)
    if key in ("kv_lora_rank", "q_lora_rank"):
        return min(v, 2 * HEAD_DIM)
    if key == "vocab_size":
        return min(v, VOCAB)
    if key == "image_size":
        return None if image is None else min(v, image)
    return None


def _get(config, key):
    try:  # some configs raise on a field read as a whole (per-layer attributes)
        return getattr(config, key, None)
    except Exception:
        return None


def _set(config, key, value) -> None:
    try:  # a read-only property is derived from fields that shrink themselves
        setattr(config, key, value)
    except AttributeError:
        pass


def tiny_config(config, image: int | None = IMAGE):
    """``config`` shrunk in place by the field rules above (sub-configs too), its images at most
    ``image`` pixels a side (None: its own size); returns it."""
    keys = sorted(set(config.to_dict()) | set(getattr(config, "attribute_map", {})))
    before = {k: _get(config, k) for k in keys}
    heads = next((v for k, v in before.items() if _HEADS.match(k) and isinstance(v, int)), None)
    head_lists = {k: list(v) for k, v in before.items() if _HEADS.match(k) and isinstance(v, list | tuple) and v}
    staged = isinstance(before.get("depths"), list | tuple)  # its layer count is the number of stages
    for key in keys:
        value = before[key]
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config
            tiny_config(value, image)
        elif isinstance(value, int) and not isinstance(value, bool) and not (staged and _DEPTH.search(key)):
            new = _shrink_int(key, value, heads, image)
            if new is not None and new != value:
                _set(config, key, new)
        elif key == "depths" and staged:
            _set(config, key, [min(d, LAYERS) for d in value])
    for key, value in head_lists.items():  # per-stage heads (Swin): 1, 2, 4 ...; widths stay divisible
        _set(config, key, [max(1, h // value[0]) for h in value])
    _derived(config, keys, before)
    return config


def _derived(config, keys, before) -> None:
    """Fields that follow the shrunk ones: copies of the old hidden or feed-forward width, a head size
    or expert count left to be derived (None), the per-layer lists, out-of-vocabulary special tokens."""
    width = next((k for k in keys if _WIDTH.match(k) and isinstance(before[k], int)), None)
    ffn = next((k for k in keys if k == "intermediate_size" and isinstance(before[k], int)), None)
    for anchor in (width, ffn):
        if anchor is None or "hidden_sizes" in keys:
            continue
        for key in keys:  # e.g. DeBERTa's pooler_hidden_size, SqueezeBERT's embedding_size
            if key != anchor and before[key] == before[anchor] and re.search("size|dim", key) and not isinstance(before[key], bool):
                _set(config, key, _get(config, anchor))
    if isinstance(before.get("embed_dim"), int) and before.get("hidden_size") == before["embed_dim"] * 2 ** (len(before.get("depths") or [1]) - 1):
        _set(config, "hidden_size", _get(config, "embed_dim") * 2 ** (len(config.depths) - 1))  # Swin: the last stage's width
    heads = _get(config, "num_attention_heads")
    if "head_dim" in keys and before["head_dim"] is None and isinstance(heads, int) and isinstance(_get(config, "hidden_size"), int):
        _set(config, "head_dim", config.hidden_size // heads)
    if "num_key_value_heads" in keys and before["num_key_value_heads"] is None and isinstance(heads, int):
        _set(config, "num_key_value_heads", heads)
    if "qk_head_dim" in keys and isinstance(_get(config, "qk_nope_head_dim"), int):
        _set(config, "qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim)
    if any(_EXPERTS.match(k) for k in keys):  # MoE fields a config leaves None
        for key, value in (("num_experts_per_tok", 2), ("n_routed_experts", EXPERTS), ("n_group", 1), ("topk_group", 1)):
            if key in keys and before[key] is None:
                _set(config, key, value)
    layers = next((_get(config, k) for k in ("num_hidden_layers", "num_layers") if isinstance(_get(config, k), int)), None)
    types = _get(config, "layer_types")
    if isinstance(types, list) and layers is not None and "layer_types" in keys:
        kinds = list(dict.fromkeys(types))  # every kind of layer stays (a hybrid needs its attention layer)
        if len(kinds) > layers:
            _set(config, "num_hidden_layers", len(kinds))
        _set(config, "layer_types", kinds + types[len(kinds):max(layers, len(kinds))])
    vocab = _get(config, "vocab_size")
    if isinstance(vocab, int):  # special tokens the smaller vocabulary no longer holds: its last ids
        for i, key in enumerate(k for k in keys if k.endswith("token_id")):
            token = _get(config, key)
            if isinstance(token, int) and token >= vocab:
                _set(config, key, vocab - 1 - i)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of a causal LM's logits (batch, tokens, vocabulary)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def logits(output) -> torch.Tensor:
    """The tensor a transformers model's output object holds as its prediction."""
    return output.logits if hasattr(output, "logits") else output


def create_case(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable | None]:
    """Class ``name`` of transformers, from its model type's default config made tiny, with random
    weights (in eval mode), a batch of two, its targets and the loss a training step takes (None:
    cross-entropy). An image model that does not run at 64 pixels is built for its default size."""
    task = _registered()[name][1]
    model, config = _build(name, task, seed, IMAGE)
    g = torch.Generator().manual_seed(seed)
    if task == "image":
        x = _images(config, g)
        try:
            with torch.no_grad():
                model(x[:1])
        except Exception:  # noqa: BLE001 - whatever a model raises at a size it cannot take (Swin's windows)
            model, config = _build(name, task, seed, image=None)
            g = torch.Generator().manual_seed(seed)
            x = _images(config, g)
        return model, x, torch.randint(0, NUM_LABELS, (2,), generator=g), None
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", VOCAB)
    ids = torch.randint(1, min(vocab, VOCAB), (2, TOKENS), generator=g)
    if task == "sequence":
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):  # encoder-decoder classifiers read the hidden state at the end token
            ids[:, -1] = eos
        return model, ids, torch.randint(0, NUM_LABELS, (2,), generator=g), None
    return model, ids, torch.roll(ids, -1, 1), next_token_loss


def _images(config, g: torch.Generator) -> torch.Tensor:
    """A batch of two images of the size and channels ``config`` (or its vision part) takes."""
    vision = getattr(config, "vision_config", config)
    side = getattr(vision, "image_size", IMAGE)
    side = side[-1] if isinstance(side, list | tuple) else side
    return torch.randn(2, getattr(vision, "num_channels", 3), side, side, generator=g)


def _build(name: str, task: str, seed: int, image: int | None):
    """``(model, config)``: class ``name`` from its tiny config, images at most ``image`` pixels."""
    import transformers

    types = _registered()[name][0]
    cls = getattr(transformers, name)
    configs = _config_names()  # the type whose config the class takes (Llama 4's text model), else its own
    model_type = next((t for t in types if configs.get(t) == cls.config_class.__name__), _own_type(name, types))
    config = tiny_config(transformers.AutoConfig.for_model(model_type), image)
    if not isinstance(config, cls.config_class):  # a composite config (Llama 4): the part this class takes
        config = next((v for v in vars(config).values() if isinstance(v, cls.config_class)), config)
    if task != "causal-lm":
        config.num_labels = NUM_LABELS
    if task == "sequence" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # decoders classify the last token that is not padding; batches need one
    if task == "causal-lm" and hasattr(config, "is_decoder"):
        config.is_decoder = True  # an encoder's LM head (BertLMHeadModel) predicts the next token only so
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    if any(_EXPERTS.match(k) for k in config.to_dict()):  # every expert on every token, in plain matmuls:
        config._experts_implementation = "batched_mm"  # grouped_mm is a custom op ONNX cannot translate
    torch.manual_seed(seed)
    return cls(config).eval(), config
