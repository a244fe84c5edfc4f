"""The mixture-of-LoRA layer (MoELoRA's dense router, SMoLoRA's separable one) against its
plain per-token, per-expert reference; the routers; attaching, saving and loading."""

import pytest
import torch

from sefe_fast.model.kv_cache import cache_kwargs, output_cache
from sefe_fast.model.mixture_attach import (
    MixtureSpec,
    attach_mixture,
    detach_mixture,
    load_mixture,
    mixture_layers,
    mixture_parameters,
    read_mixture_spec,
    routing_context,
    save_mixture,
)
from sefe_fast.model.mixture_lora import (
    MixtureLoRALinear,
    RoutingContext,
    reference_mixture_delta,
    router_weights,
    sequence_mean,
)
from sefe_fast.model.tiny import TinyConfig, build_tiny_model

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128)


def _layer(routing, top_k=None, experts=4, rank=8, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(6, 5, bias=True).double()
    ctx = RoutingContext(instruction=torch.randn(3, dtype=torch.float64))
    layer = MixtureLoRALinear(
        base,
        experts=experts,
        rank=rank,
        alpha=16,
        routing=routing,
        top_k=top_k,
        instruction_dim=3 if routing == "separable" else None,
        context=ctx,
    ).double()
    with torch.no_grad():  # B starts at 0: give every factor and router a value
        for name, p in layer.named_parameters():
            if name.startswith("lora_"):
                p.normal_(0, 0.7)
    return layer


def _delta_and_grads(layer, fn, x, probe):
    layer.zero_grad()
    delta = fn(x)
    (delta * probe).sum().backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in layer.named_parameters()
        if n.startswith("lora_")
    }
    return delta.detach(), grads


@pytest.mark.parametrize(
    ("routing", "top_k"), [("dense", None), ("dense", 2), ("dense", 1), ("separable", None)]
)
def test_fused_mixture_equals_plain_loop_outputs_and_gradients(routing, top_k):
    layer = _layer(routing, top_k)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    probe = torch.randn(3, 5, 5, dtype=torch.float64)
    fused, fused_grads = _delta_and_grads(layer, lambda x: layer(x) - layer.base_layer(x), x, probe)
    plain, plain_grads = _delta_and_grads(
        layer, lambda x: reference_mixture_delta(layer, x), x, probe
    )
    assert fused.abs().max() > 0.1  # the experts do something
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-10)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-9, atol=1e-10)
    assert fused_grads["lora_A"].abs().max() > 0 and fused_grads["lora_B"].abs().max() > 0
    if routing == "dense" and top_k != 1:
        assert fused_grads["lora_router.weight"].abs().max() > 0  # the router learns
    if routing == "separable":
        # the published top-1 routers get no gradient; the per-token mix does
        assert fused_grads["lora_vu_gate.weight"].abs().max() == 0
        assert fused_grads["lora_ins_gate.weight"].abs().max() == 0
        assert fused_grads["lora_fc_vu.weight"].abs().max() > 0


def test_separable_mean_skips_padding_and_decoding_reuses_the_choice():
    layer = _layer("separable", seed=4)
    x = torch.randn(4, 6, 6, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    # padding that pulls the plain mean towards the other expert of each padded row
    gate = layer.lora_vu_gate.weight.detach()
    toward_1 = (gate[1] - gate[0]) / (gate[1] - gate[0]).norm()
    chosen = layer.lora_vu_gate(sequence_mean(x, mask)).argmax(-1)
    for row, cols in ((1, slice(0, 3)), (2, slice(4, 6))):
        x[row, cols] = 100.0 * toward_1 * (1 if chosen[row] == 0 else -1)
    assert torch.equal(layer.lora_vu_gate(sequence_mean(x, mask)).argmax(-1), chosen)
    assert not torch.equal(layer.lora_vu_gate(x.mean(1)).argmax(-1), chosen)
    layer.context.token_mask = mask
    fused = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(fused, reference_mixture_delta(layer, x, mask))
    choice = layer.context.choices[id(layer)].clone()
    # a cached decoding step (mask one longer than the full forward, one new token)
    step = torch.randn(4, 1, 6, dtype=torch.float64)
    layer.context.token_mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
    layer.context.continuing = True
    layer(step)
    assert torch.equal(layer.context.choices[id(layer)], choice)
    vu = layer.expert_weights(step)[:, 0, :2]
    assert torch.equal(vu.argmax(-1), choice)


def test_router_weights_softmax_top_k_and_determinism():
    torch.manual_seed(1)
    logits = torch.randn(7, 5, 8)
    dense = router_weights(logits)
    torch.testing.assert_close(dense.sum(-1), torch.ones(7, 5))
    torch.testing.assert_close(dense, torch.softmax(logits, -1))
    top2 = router_weights(logits, 2)
    torch.testing.assert_close(top2.sum(-1), torch.ones(7, 5))
    assert ((top2 > 0).sum(-1) == 2).all()
    kept = top2 > 0
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(2, -1).indices, True))
    top1 = router_weights(logits, 1)
    assert torch.equal(top1, torch.nn.functional.one_hot(logits.argmax(-1), 8).float())
    tie = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert torch.equal(router_weights(tie, 1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    flat = torch.zeros(3, 40)  # all equal: the lowest indices, whatever the sort's internals
    assert torch.equal(router_weights(flat, 1).argmax(-1), torch.zeros(3, dtype=torch.long))
    assert ((router_weights(flat, 3) > 0).nonzero()[:, 1] == torch.arange(3).repeat(3)).all()
    assert torch.equal(router_weights(logits, 2), top2)  # the same call, the same weights
    with pytest.raises(ValueError, match="top_k"):
        router_weights(logits, 0)


def test_sequence_mean_over_real_tokens():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(sequence_mean(x, mask), torch.stack([x[0, :2].mean(0), x[1, 2]]))
    torch.testing.assert_close(sequence_mean(x, None), x.mean(1))


def test_layer_rejects_a_rank_the_experts_do_not_divide():
    with pytest.raises(ValueError, match="multiple of experts"):
        MixtureLoRALinear(torch.nn.Linear(4, 4), experts=3, rank=8, alpha=8)
    with pytest.raises(ValueError, match="even expert count"):
        MixtureLoRALinear(torch.nn.Linear(4, 4), experts=4, rank=8, alpha=8, routing="separable")


def _tiny():
    model = build_tiny_model(SMALL, seed=0).model
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _inputs():
    torch.manual_seed(3)
    ids = torch.randint(5, 100, (2, 24))
    ids[:, 1:17] = 4
    mask = torch.ones(2, 24, dtype=torch.long)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32), "attention_mask": mask}


def test_attach_targets_and_fresh_mixture_leaves_the_model_unchanged():
    model = _tiny()
    before = model(**_inputs()).logits
    spec = MixtureSpec(experts=4, rank=8, alpha=16, dropout=0.0)
    attach_mixture(model, spec)
    names = [n for n, _ in mixture_layers(model)]
    assert len(names) == SMALL.text_layers * 7 and all(".language_model." in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    torch.testing.assert_close(model(**_inputs()).logits, before)  # B = 0
    detach_mixture(model)
    assert not mixture_layers(model)
    assert not model._forward_pre_hooks


def _smolora_spec() -> MixtureSpec:
    """SMoLoRA's layout on the tiny model: 4 experts of rank 8, MLP + projector targets."""
    return MixtureSpec(
        experts=4,
        rank=8,
        alpha=16,
        dropout=0.0,
        routing="separable",
        targets=("gate_proj", "up_proj", "down_proj"),
        projector=True,
        instruction_dim=64,
    )


def test_smolora_targets_mlp_and_projector_and_routes_by_the_call_mask():
    model = _tiny()
    spec = _smolora_spec()
    ctx = attach_mixture(model, spec)
    names = {n.rsplit(".", 1)[-1] for n, _ in mixture_layers(model)}
    assert names == {"gate_proj", "up_proj", "down_proj", "linear_1", "linear_2"}
    ctx.instruction = torch.randn(64)
    inputs = _inputs()
    inputs["attention_mask"][0, 20:] = 0
    model(**inputs)
    assert ctx.token_mask is inputs["attention_mask"]  # the pre-hook passed the call's mask
    labels = torch.full((2, 24), -100)
    labels[:, 18:] = inputs["input_ids"][:, 18:]
    model(**inputs, labels=labels)  # training: the prompt routes, not the answer
    expected = inputs["attention_mask"].clone()
    expected[:, 18:] = 0
    assert torch.equal(ctx.token_mask, expected)


def test_save_load_roundtrip_restores_outputs(tmp_path):
    spec = MixtureSpec(experts=2, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    model = _tiny()
    attach_mixture(model, spec)
    with torch.no_grad():
        for p in mixture_parameters(model):
            p.normal_(0, 0.3)
    expected = model(**_inputs()).logits
    save_mixture(model, tmp_path / "m")
    assert read_mixture_spec(tmp_path / "m") == spec
    other = _tiny()
    torch.manual_seed(5)
    attach_mixture(other, read_mixture_spec(tmp_path / "m"))
    assert not torch.allclose(other(**_inputs()).logits, expected)
    load_mixture(other, tmp_path / "m")
    torch.testing.assert_close(other(**_inputs()).logits, expected)
    assert routing_context(other) is mixture_layers(other)[0][1].context


def test_load_names_the_file_when_the_mixture_differs(tmp_path):
    model = _tiny()
    attach_mixture(model, MixtureSpec(experts=2, rank=4, alpha=8, dropout=0.0))
    save_mixture(model, tmp_path / "m")
    other = _tiny()
    attach_mixture(other, MixtureSpec(experts=2, rank=8, alpha=8, dropout=0.0))
    with pytest.raises(ValueError, match=r"mixture\.safetensors.*shape"):
        load_mixture(other, tmp_path / "m")
    (tmp_path / "m" / "mixture_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"mixture_config\.json"):
        read_mixture_spec(tmp_path / "m")


def test_separable_decoding_with_a_cache_routes_as_the_training_forward():
    """A cached decoding step reuses the prompt's routing; a training forward over the
    prompt plus the answer (labelled) routes by the prompt too: the same logits."""
    model = _tiny()
    spec = _smolora_spec()
    ctx = attach_mixture(model, spec)
    torch.manual_seed(11)
    ctx.instruction = torch.randn(64)
    with torch.no_grad():
        for p in mixture_parameters(model):
            p.normal_(0, 0.5)
    inputs = _inputs()
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        step = model(
            input_ids=token,
            attention_mask=mask,
            **cache_kwargs(output_cache(prefill)),
            use_cache=True,
        )
        assert ctx.continuing
        ids = torch.cat([inputs["input_ids"], token], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -1:] = token
        full = model(
            input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=mask, labels=labels
        )
        assert not ctx.continuing
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_one_expert_is_plain_lora_scaled_by_alpha_over_the_total_rank():
    torch.manual_seed(2)
    layer = MixtureLoRALinear(torch.nn.Linear(6, 5), experts=4, rank=8, alpha=16)
    # the published initialisation: A ~ N(0, 0.01²), B = 0; the scale uses the total rank
    assert layer.lora_A.std().item() == pytest.approx(0.01, rel=0.3)
    assert not layer.lora_B.any() and layer.scaling == 16 / 8 and layer.expert_rank == 2
    single = MixtureLoRALinear(torch.nn.Linear(6, 5), experts=1, rank=4, alpha=12)
    with torch.no_grad():
        single.lora_B.normal_()
    x = torch.randn(2, 3, 6)
    lora = (12 / 4) * x @ single.lora_A.T @ single.lora_B.T
    torch.testing.assert_close(single(x), single.base_layer(x) + lora)


def test_bf16_base_with_fp32_experts_keeps_the_base_dtype():
    torch.manual_seed(2)
    layer = MixtureLoRALinear(torch.nn.Linear(6, 5).bfloat16(), experts=2, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    expected = layer.base_layer(x).float() + reference_mixture_delta(layer, x.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
