"""Planning on the meta device: a model built under ``torch.device("meta")`` holds no
memory, and its plan is the one its real twin gets: the same layers, figures, layouts and blocks."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from auglocal_fx import build_plan


def _figures(plan):
    return ([(x.name, x.params, x.flops, x.act_bytes, tuple(x.layouts), x.bundle) for x in plan.layers],
            [b.layers for b in plan.blocks], [a.selected_layers for a in plan.aux],
            (plan.head.params, plan.head.flops, plan.head.act_bytes))


@pytest.mark.parametrize("make,blocks,size", [
    (lambda: timm.create_model("resnet18"), 8, (3, 64, 64)),
    (lambda: timm.create_model("vit_tiny_patch16_224"), 12, (3, 224, 224)),
    (lambda: torchvision.models.mobilenet_v3_small(), 8, (3, 64, 64)),
], ids=["resnet18", "vit_tiny", "tv_mobilenet_v3_small"])
def test_a_model_on_the_meta_device_plans_as_its_real_twin(make, blocks, size):
    torch.manual_seed(0)
    real = build_plan(make(), blocks, input_size=size)
    with torch.device("meta"):
        model = make()
    plan = build_plan(model, blocks, input_size=size)
    assert _figures(plan) == _figures(real)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())


def test_a_hugging_face_model_on_the_meta_device_plans_through_export_as_its_real_twin():
    """Export traces a meta model on meta examples; the tensors its forward makes or moves to the
    input's device (Llama's rotary frequencies) are planned as on the CPU."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(0, 100, (1, 16))
    real = build_plan(transformers.LlamaForCausalLM(config), 3, example_inputs=ids)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plan = build_plan(model, 3, example_inputs=ids)
    assert plan.config.traced_with == "export" and _figures(plan) == _figures(real)
    assert all(p.is_meta for p in model.parameters())
