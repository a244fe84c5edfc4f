"""Batched greedy decoding (left padding + KV cache) against a slow one-prompt reference."""

import warnings

import torch

from sefe_fast.generate import encode_prompt, greedy_generate, left_pad
from sefe_fast.model.tiny import TinyConfig, build_tiny_model

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128)


def _reference_greedy(model, prompt, pixels, max_new_tokens, eos, banned):
    """No cache, no padding: re-run the whole sequence for every new token."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits
            last = logits[0, -1].clone()
            last[banned] = float("-inf")
            token = int(last.argmax())
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


def _sharpen(model):
    """Scale the LM head so greedy outputs are varied (not one repeated token) and far from ties."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)


def test_left_pad_puts_real_tokens_last():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encode_prompt_expands_image_and_uses_template():
    bundle = build_tiny_model(SMALL, seed=0)
    ids = encode_prompt(
        "What colour?", bundle.tokenizer, image_token_id=bundle.image_token_id, num_image_tokens=16
    )
    assert ids.count(bundle.image_token_id) == 16
    text = bundle.tokenizer.decode([i for i in ids if i != bundle.image_token_id])
    assert text.endswith("USER: \nWhat colour? ASSISTANT:")
    assert ids[0] == bundle.tokenizer.bos_token_id


def test_batched_greedy_matches_unbatched_reference():
    bundle = build_tiny_model(SMALL, seed=0)
    model = bundle.model.eval()
    _sharpen(model)
    tok = bundle.tokenizer
    questions = ["Hi", "What is the colour of the shape on the left?", "abc def", "Count."]
    prompts = [
        encode_prompt(q, tok, image_token_id=bundle.image_token_id, num_image_tokens=16)
        for q in questions
    ]
    torch.manual_seed(1)
    pixels = torch.randn(len(prompts), 3, 32, 32)
    eos = tok.eos_token_id

    def generate(batch_size: int) -> list[list[int]]:
        return greedy_generate(
            model,
            prompts,
            pixels,
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            banned_token_ids=[bundle.image_token_id],
            batch_size=batch_size,
        )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = generate(batch_size=4)
    # The KV cache is passed under the installed transformers' own keyword: no deprecation
    # warning per decoding step (a default run used to print 512).
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    reference = [
        _reference_greedy(model, p, px, 12, eos, bundle.image_token_id)
        for p, px in zip(prompts, pixels)
    ]
    assert batched == reference
    assert len({tuple(o) for o in batched}) > 1  # not a degenerate constant output
    # Different batch sizes (different padding) give the same outputs, in input order.
    again = generate(batch_size=3)
    assert again == reference


def test_generation_stops_at_eos_and_respects_max_new_tokens():
    bundle = build_tiny_model(SMALL, seed=0)
    model = bundle.model.eval()
    tok = bundle.tokenizer
    prompts = [
        encode_prompt(q, tok, image_token_id=bundle.image_token_id, num_image_tokens=16)
        for q in ("a", "bb")
    ]
    pixels = torch.zeros(2, 3, 32, 32)
    favourite = {"token": tok.eos_token_id}

    def force(module, inputs, output):  # the LM head always prefers favourite["token"]
        bonus = torch.zeros_like(output)
        bonus[..., favourite["token"]] = 1e4
        return output + bonus

    model.lm_head.register_forward_hook(force)
    kwargs = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert greedy_generate(model, prompts, pixels, max_new_tokens=5, **kwargs) == [[], []]
    favourite["token"] = tok.convert_tokens_to_ids("x")
    out = greedy_generate(model, prompts, pixels, max_new_tokens=5, **kwargs)
    assert out == [[favourite["token"]] * 5] * 2
