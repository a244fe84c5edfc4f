"""Batched greedy decoding for LLaVA: left padding, one prefill, then a KV cache.

Left padding keeps every prompt's last token in the last column, so one argmax over the
last logits gives each row's next token; position ids count only real tokens, so a padded
row sees exactly the positions it would see alone.

Text-only prompts (ScienceQA questions without a picture) have no image tokens and no
pixel values; a batch passes the images of the prompts that have one, in order (LLaVA fills
the i-th run of image tokens with image i's features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from sefe_fast.data.conversation import (
    add_bos,
    build_generation_prompt,
    image_placeholder_id,
    with_image_placeholder,
    without_image_placeholder,
)
from sefe_fast.model.kv_cache import cache_kwargs, output_cache


def encode_prompt(
    question: str,
    tokenizer: Any,
    *,
    image_token_id: int,
    num_image_tokens: int,
    has_image: bool = True,
) -> list[int]:
    """Token ids of the generation prompt for `question` (the tokenizer's chat template, else
    vicuna_v1), `<image>` expanded.

    With an image, `<image>\\n` is put in front of the question when it has no placeholder
    (LLaVA's eval prompt); the placeholder becomes `num_image_tokens` copies of
    `image_token_id`. Without one (`has_image=False`), any `<image>` is removed from the
    question and the rest stripped, as the official ScienceQA evaluation does.
    """
    text = with_image_placeholder(question) if has_image else without_image_placeholder(question)
    prompt = build_generation_prompt(text, tokenizer)
    placeholder = image_placeholder_id(tokenizer)
    ids: list[int] = []
    for token in tokenizer(prompt, add_special_tokens=add_bos(tokenizer))["input_ids"]:
        if token == placeholder:
            ids.extend([image_token_id] * num_image_tokens)
        else:
            ids.append(int(token))
    return ids


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (input_ids [B, L], attention_mask [B, L], 1 on real tokens)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty")
        ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    banned_token_ids: Sequence[int] = (),
    lockstep: bool = False,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt, up to and excluding eos.

    pixel_values: [N, 3, H, W] on the model's device, the images of the N prompts that
    hold image tokens, in prompt order (None when no prompt has one; then `device` says
    where to run). `banned_token_ids` are never chosen (the image placeholder: a generated
    one could not be fed back). `lockstep`: keep decoding until every rank's batch is done
    (a sharded model's forward is collective; a batch without images then still runs the
    vision tower once on a blank image, as the other ranks do). Returns the new token ids
    per prompt.
    """
    if pixel_values is not None:
        device = pixel_values.device
    elif device is None:
        raise ValueError("greedy_generate_batch: give `device` when no prompt has an image")
    elif lockstep:
        vision_anchor(model, device)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = input_ids.shape[0]
    out = model(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_positions = position_ids[:, -1:] + 1
    banned = torch.as_tensor(list(banned_token_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        if banned_token_ids:
            logits = logits.index_fill(-1, banned, float("-inf"))
        next_token = logits.argmax(dim=-1)
        finished |= next_token == eos_token_id
        for row in torch.nonzero(~finished).flatten().tolist():
            generated[row].append(int(next_token[row]))
        if step == max_new_tokens - 1 or _all_done(bool(finished.all()), lockstep, device):
            break
        step_ids = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=step_ids[:, None],
            attention_mask=attention_mask,
            position_ids=next_positions,
            **cache_kwargs(output_cache(out)),
            use_cache=True,
        )
        next_positions = next_positions + 1
    return generated


def _global_max(value: int, lockstep: bool, device: torch.device | str) -> int:
    """`value`, or (lockstep) its maximum over ranks."""
    if not lockstep:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return int(box.item())


def _all_done(done: bool, lockstep: bool, device: torch.device) -> bool:
    """`done` on this rank, or (lockstep) on every rank."""
    return _global_max(int(not done), lockstep, device) == 0


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pixel_values: Sequence[torch.Tensor | None] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    banned_token_ids: Sequence[int] = (),
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "generating",
    autocast: Any = None,
    lockstep: bool = False,
) -> list[list[int]]:
    """Greedy-decode many prompts in batches of similar length; outputs in input order.

    `pixel_values[i]` ([3, H, W]) is prompt i's image, None for a text-only prompt. `autocast` is an optional context
    manager factory (bf16 on CUDA); `banned_token_ids` are never generated. `lockstep`
    (a sharded model): every rank runs as many batches and decoding steps as the busiest
    one, repeating its first batch and dropping the outputs where it has run out; every
    rank needs at least one prompt. Returns the generated token ids (eos excluded).
    """
    if len(prompts) != len(pixel_values):
        raise ValueError(f"{len(prompts)} prompts but {len(pixel_values)} images")
    if lockstep and not prompts:
        raise ValueError("lockstep generation needs at least one prompt on every rank")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    starts = list(range(0, len(order), batch_size))
    n_batches = _global_max(len(starts), lockstep, device)
    try:
        for b in tqdm(range(n_batches), desc=desc, unit="batch", disable=not progress, leave=False):
            padding = b >= len(starts)  # lockstep only: this rank is out of prompts
            rows = order[starts[0 if padding else b] :][:batch_size]
            images = [pixel_values[i] for i in rows if pixel_values[i] is not None]
            pixels = torch.stack(images).to(device) if images else None
            with autocast() if autocast is not None else contextlib.nullcontext():
                outputs = greedy_generate_batch(
                    model,
                    [prompts[i] for i in rows],
                    pixels,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    banned_token_ids=banned_token_ids,
                    lockstep=lockstep,
                    device=device,
                )
            if padding:
                continue
            for row, output in zip(rows, outputs):
                results[row] = output
    finally:
        model.train(was_training)
    return results


def vision_anchor(model: torch.nn.Module, device: torch.device | str) -> torch.Tensor:
    """0 times the image features of one blank image: a scalar zero that depends on the
    vision tower and the projector.

    A batch of text-only samples skips the vision path. Under DDP the projector then gets
    no gradient on that rank, and under FSDP the sharded vision tower's collectives go out
    of step with the other ranks; adding this zero keeps every rank on the same path
    (the official LLaVA code does the same with an empty slice of image features).
    """
    size = model.config.vision_config.image_size
    blank = torch.zeros((1, 3, size, size), device=device)
    features = model.get_image_features(pixel_values=blank)
    if not isinstance(features, torch.Tensor | list | tuple):  # a model output object
        features = features.pooler_output
    if isinstance(features, list | tuple):  # one tensor per image
        features = torch.cat([f.reshape(-1) for f in features])
    return 0.0 * features.float().sum()
