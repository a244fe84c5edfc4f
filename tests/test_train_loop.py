"""Loop units: schedule, gradient-accumulation equivalence, NaN stop, resume, batch order."""

import math
import random
import warnings
from types import SimpleNamespace

import pytest
import torch

from sefe_fast.model.accel import AccelConfig
from sefe_fast.train.checkpoint import (
    RunMismatchError,
    RunStateError,
    load_train_state,
    save_train_state,
)
from sefe_fast.train.distributed import DistContext
from sefe_fast.train.feed import BatchSchedule
from sefe_fast.train.loop import (
    LoopConfig,
    NonFiniteLossError,
    check_finite_weights,
    count_label_tokens,
    train_task,
)
from sefe_fast.train.train_log import TrainLog

DIST = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
VOCAB = 11


class ToyLM(torch.nn.Module):
    """Embedding + linear LM with the HF loss convention (sum CE / num_items_in_batch)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask, labels, pixel_values, num_items_in_batch):
        logits = self.head(self.emb(input_ids) + pixel_values.mean())
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return SimpleNamespace(loss=ce / num_items_in_batch)


def _dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # uneven answer lengths: token-mean matters
        items.append({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(1)})
    return items


def _collate(items):
    longest = max(len(i["input_ids"]) for i in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    labels = torch.full((len(items), longest), -100)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.stack([i["pixel_values"] for i in items]),
    }


def _train(cfg, model=None, **kwargs):
    model = model or ToyLM()
    groups = [{"params": list(model.parameters()), "lr": 0.05}]
    result = train_task(
        model, _dataset(), _collate, groups, cfg, DIST, accel=AccelConfig(), **kwargs
    )
    return model, result


def test_cosine_schedule_with_warmup():
    cfg = LoopConfig(per_device_batch_size=4, max_steps=20, warmup_ratio=0.1, max_grad_norm=0)
    log_rows = []

    class Recorder(TrainLog):
        def append(self, row, flush=True):
            log_rows.append(row)

    _train(cfg, log=Recorder("unused", enabled=False), log_fields={"phase": "t"})
    # LoopConfig.log_every=10: rows at steps 10 and 20 hold the lr used for the *next* step.
    base, warmup, total = 0.05, 2, 20
    for row in log_rows:
        step = row["step"]  # scheduler has stepped `step` times
        progress = (step - warmup) / (total - warmup)
        expected = base * 0.5 * (1 + math.cos(math.pi * progress))
        assert row["lr"][0] == pytest.approx(expected, abs=1e-9)
    assert [r["step"] for r in log_rows] == [10, 20]


def test_gradient_accumulation_equals_one_big_batch():
    big, _ = _train(LoopConfig(per_device_batch_size=8, grad_accum=1, max_steps=3, seed=5))
    acc, _ = _train(LoopConfig(per_device_batch_size=4, grad_accum=2, max_steps=3, seed=5))
    small, _ = _train(LoopConfig(per_device_batch_size=4, grad_accum=1, max_steps=3, seed=5))
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ...and it is not trivially equal: half the batch gives another update.
    assert any(not torch.allclose(a, c) for a, c in zip(big.parameters(), small.parameters()))


def test_batch_schedule_covers_each_epoch_once_and_shards_ranks():
    ranks = [
        BatchSchedule(
            20,
            batch_size=3,
            grad_accum=1,
            seed=1,
            dist=DistContext(rank=r, world_size=2, local_rank=r, device=torch.device("cpu")),
        )
        for r in range(2)
    ]
    assert ranks[0].steps_per_epoch == 3  # 10 per rank -> 3 full micro-batches
    epoch0 = [i for s in ranks for m in range(3) for i in s.micro_batch(m)]
    assert len(epoch0) == len(set(epoch0)) == 18
    assert ranks[0].micro_batch(0) != ranks[0].micro_batch(3)  # epoch 1 is reshuffled
    with pytest.raises(ValueError, match="too few"):
        BatchSchedule(3, batch_size=4, grad_accum=1, seed=0, dist=DIST)


def test_length_grouping_keeps_each_epochs_samples_and_batches_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.choice((20, 300)) for _ in range(64)]
    make = lambda grouped: BatchSchedule(  # noqa: E731
        64, batch_size=4, grad_accum=1, seed=3, dist=DIST, lengths=lengths if grouped else None
    )
    plain, grouped = make(False), make(True)
    steps = plain.steps_per_epoch
    for epoch in range(2):
        ms = range(epoch * steps, (epoch + 1) * steps)
        # The same samples each epoch (the sampler's), only regrouped.
        assert sorted(i for m in ms for i in plain.micro_batch(m)) == sorted(
            i for m in ms for i in grouped.micro_batch(m)
        )

    def padded_tokens(schedule):
        return sum(4 * max(lengths[i] for i in schedule.micro_batch(m)) for m in range(steps))

    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)
    mixed = [m for m in range(steps) if len({lengths[i] for i in grouped.micro_batch(m)}) > 1]
    assert len(mixed) <= 2  # at most the boundary batch of each group of 8 (here 2 groups)
    assert grouped.micro_batch(0) != grouped.micro_batch(steps)  # epoch 1 regrouped


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    cfg = LoopConfig(per_device_batch_size=4, max_steps=10, save_every=2)

    def poison(model, step):  # step is 0-based: the 6th step goes NaN
        return torch.tensor(float("nan")) if step == 5 else None

    with pytest.raises(NonFiniteLossError, match="non-finite loss at optimizer step 6"):
        _train(cfg, extra_loss=poison, save_checkpoint=lambda s: save_train_state(path, s))
    saved = load_train_state(path)
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["trainable"].values())


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_non_finite_gradient_with_finite_loss_stops_before_the_step(max_grad_norm):
    """sqrt at 0: the penalty's value is 0 (finite loss) but its gradient is inf · 0 = NaN."""
    cfg = LoopConfig(per_device_batch_size=4, max_steps=3, max_grad_norm=max_grad_norm)
    model = ToyLM()
    before_last = {}

    def poison(m, step):
        if step < 2:
            return None
        before_last.update({n: p.detach().clone() for n, p in m.named_parameters()})
        return torch.sqrt((m.head.weight * 0).sum())

    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient .* at optimizer step 3"):
        _train(cfg, model=model, extra_loss=poison)
    # The NaN never reached the weights: they are those after step 2.
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all()
        assert torch.equal(param.detach(), before_last[name]), name


def test_non_finite_weights_are_never_saved_as_a_stage():
    model = ToyLM()
    check_finite_weights(model, "stage 1 T")  # finite: nothing happens
    with torch.no_grad():
        model.head.bias[3] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"stage 1 T: trainable weight head\.bias"):
        check_finite_weights(model, "stage 1 T")


def test_checkpoint_of_other_settings_or_damaged_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_train_state(path, {"step": 2}, "aaaa")
    assert load_train_state(path, "aaaa")["step"] == 2
    with pytest.raises(RunMismatchError, match=r"other settings.*--restart"):
        load_train_state(path, "bbbb")
    path.write_bytes(path.read_bytes()[:50])  # truncated by a full disk or a copy
    with pytest.raises(RunStateError, match=r"ckpt\.pt: the in-task checkpoint cannot be read"):
        load_train_state(path, "aaaa")


def test_a_restarted_phase_replaces_the_killed_attempts_log_rows(tmp_path):
    """Killed before its first checkpoint, a phase restarts at step 0: its old rows go."""
    log = TrainLog(tmp_path / "log.jsonl")
    log.append({"phase": "other", "step": 5})
    log.append({"phase": "t", "step": 1})
    log.append({"phase": "t", "step": 2})
    cfg = LoopConfig(per_device_batch_size=4, max_steps=3, log_every=1)
    _train(cfg, log=TrainLog(tmp_path / "log.jsonl"), log_fields={"phase": "t"})
    rows = TrainLog(tmp_path / "log.jsonl").rows
    assert [(r["phase"], r["step"]) for r in rows] == [("other", 5), ("t", 1), ("t", 2), ("t", 3)]


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    cfg = LoopConfig(per_device_batch_size=4, max_steps=7, save_every=3, seed=2)
    full, _ = _train(cfg)
    states = []
    _train(LoopConfig(**{**cfg.__dict__, "max_steps": 7}), save_checkpoint=states.append)
    first = states[0]  # after step 3
    assert first["step"] == 3
    resumed, result = _train(cfg, model=ToyLM(seed=123), resume=first)
    assert result.resumed_from == 3
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_extra_loss_is_added_once_per_step_with_its_gradient():
    calls = []

    def pull_to_zero(model, step):
        calls.append(step)
        return 1e3 * model.head.bias.abs().sum()

    model, result = _train(
        LoopConfig(per_device_batch_size=4, grad_accum=2, max_steps=4, max_grad_norm=0),
        extra_loss=pull_to_zero,
    )
    assert calls == [0, 1, 2, 3]
    assert result.last_penalty > 0
    plain, _ = _train(
        LoopConfig(per_device_batch_size=4, grad_accum=2, max_steps=4, max_grad_norm=0)
    )
    assert model.head.bias.abs().sum() < plain.head.bias.abs().sum()


def test_count_label_tokens_uses_shifted_labels():
    batch = {"labels": torch.tensor([[5, -100, 3, 4], [-100, -100, -100, 1]])}
    assert count_label_tokens(batch) == 3  # the first column is never predicted


def _tiny_batch():
    from sefe_fast.data.coin import collate_train
    from sefe_fast.data.conversation import tokenize_conversation
    from sefe_fast.model.tiny import TinyConfig, build_tiny_model

    bundle = build_tiny_model(
        TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128), seed=0
    )
    items = []
    for i in range(3):
        conv = [
            {"from": "human", "value": "<image>\nWhat is it?" + " x" * i},
            {"from": "gpt", "value": "a cat" + "s" * (3 * i)},
        ]
        tok = tokenize_conversation(
            conv,
            bundle.tokenizer,
            image_token_id=bundle.image_token_id,
            num_image_tokens=16,
            max_length=512,
        )
        items.append(
            {
                "input_ids": torch.tensor(tok.input_ids),
                "labels": torch.tensor(tok.labels),
                "pixel_values": torch.randn(3, 32, 32),
            }
        )
    return bundle, collate_train(items, bundle.tokenizer.pad_token_id)


def test_shared_prompt_prefix_gives_the_same_loss_and_gradients():
    from sefe_fast.train.loop import forward_with_shared_prefix, shared_prefix_length

    bundle, batch = _tiny_batch()
    model = bundle.model.train()
    for module in model.modules():  # dropout would differ between the two passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    prefix = shared_prefix_length(batch, bundle.image_token_id)
    first_image = int((batch["input_ids"][0] == bundle.image_token_id).nonzero()[0])
    assert 100 < prefix <= first_image  # bos + system line + "USER: "
    n_items = torch.tensor(float(count_label_tokens(batch)))
    grads = []
    for p in (0, prefix):
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = forward_with_shared_prefix(model, model, batch, n_items, p)
        assert not [w for w in caught if "past_key_values" in str(w.message)]
        out.loss.backward()
        grads.append(
            (
                out.loss.detach(),
                {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None},
            )
        )
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    assert any("lora" not in n and "language_model" in n for n in grads[0][1])
    for name, g in grads[0][1].items():
        if name.endswith("k_proj.bias"):  # its exact gradient is 0 (softmax shift): noise
            continue
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-6)


def test_shared_prefix_stops_before_labels_and_images():
    from sefe_fast.train.loop import shared_prefix_length

    ids = torch.arange(60).repeat(2, 1)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.full_like(ids, -100),
    }
    batch["labels"][1, 50] = 7  # predicted from position 49: the prefix must end at 49
    assert shared_prefix_length(batch, image_token_id=None) == 49
    assert shared_prefix_length(batch, image_token_id=40) == 40
    assert shared_prefix_length(batch, image_token_id=10) == 0  # too short to pay off
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][1, 35] = 0  # rows differ from position 35
    assert shared_prefix_length(batch, image_token_id=None) == 35
