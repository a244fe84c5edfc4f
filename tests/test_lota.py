"""`lota`: the mask rule (top-k |τ| over the positions earlier masks left free) against a plain
loop, masked training that leaves every other entry exactly as it was (AdamW weight decay
included), and the masks in the compact key-element storage, reloaded on resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train_loop import _tiny_batch

from sefe_fast.methods import MethodConfig, build_method
from sefe_fast.methods.base import TRAIN
from sefe_fast.methods.lota import (
    CALIBRATE,
    dense_mask,
    select_sparse_mask,
    target_weights,
)
from sefe_fast.reglora import KeyElements, load_key_elements
from sefe_fast.run_layout import lota_mask_path


def _reference_mask(tau, keep, used):
    """Plain loop: positions by |τ| descending, skipping used ones, the first int(keep·n)."""
    flat, used = tau.abs().flatten().tolist(), used.flatten().tolist()
    k = int(keep * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    return set([i for i in order if not used[i]][:k])


def test_mask_is_the_top_k_of_the_task_vector_over_the_free_positions():
    torch.manual_seed(0)
    tau = torch.randn(16, 24)
    used = torch.rand(16, 24) < 0.3
    for keep in (0.1, 0.25):
        got = select_sparse_mask(tau, keep, used)
        assert len(got) == int(keep * 16 * 24)
        assert set(got.tolist()) == _reference_mask(tau, keep, used)
        assert not used.flatten()[got].any()
    free = set(select_sparse_mask(tau, 0.5, used=None).tolist())
    assert free == _reference_mask(tau, 0.5, torch.zeros_like(used))
    # Fewer free positions than k: every free one.
    crowded = torch.rand(16, 24) < 0.95
    got = select_sparse_mask(tau, 0.1, crowded)
    assert set(got.tolist()) == set(torch.nonzero(~crowded.flatten()).flatten().tolist())


def _assert_top_k(chosen, score, used, keep):
    """`chosen` is a top-k of `score` over the free positions (Adam's first steps give many
    equal |τ|: any of the tied entries may be the last ones chosen)."""
    taken = torch.zeros_like(used)
    taken[chosen] = True
    assert len(chosen) == int(keep * score.numel()) == int(taken.sum())
    assert not (taken & used).any()
    assert score[taken].min() >= score[~taken & ~used].max()


SETTINGS = SimpleNamespace(
    lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lr=3e-3, projector_lr=2e-3, fft_lr=None,
    epochs=1.0, lota_calibration_steps=None, max_steps_for=lambda task: 20,
)  # fmt: skip


def _train(method, model, batch, steps, weight_decay):
    optimizer = torch.optim.AdamW(
        method.trainable_groups(model, SETTINGS), weight_decay=weight_decay
    )
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        method.after_step(model)
        optimizer.zero_grad(set_to_none=True)


def _weights(model):
    return {n: p.detach().clone() for n, p in target_weights(model).items()}


def test_lota_trains_only_its_mask_and_later_masks_avoid_it(tmp_path):
    bundle, batch = _tiny_batch()
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(False)
    method = build_method("lota", MethodConfig(lota_sparsity=0.9))
    masks = []
    for stage, task in ((1, "A"), (2, "B")):
        model = method.attach(model, SETTINGS)
        start = _weights(model)
        phases = method.phases(SETTINGS, stage, task, tmp_path)
        assert [(p.name, p.max_steps) for p in phases] == [(CALIBRATE, 2), ("train", None)]
        calibrate = phases[0]
        method.begin_phase(model, calibrate, stage, task, tmp_path)
        _train(method, model, batch, steps=2, weight_decay=0.0)
        calibrated = _weights(model)
        method.end_phase(model, calibrate, stage, task, tmp_path, write=True)
        # The weights are back at W; the mask is the reference rule on τ = W_cal − W.
        used = {n: dense_mask(ke) for n, ke in method.used.items()}
        for name, w in _weights(model).items():
            assert torch.equal(w, start[name]), name
            tau = calibrated[name] - start[name]
            free = used.get(name, torch.zeros_like(tau, dtype=torch.bool))
            _assert_top_k(method.mask[name].linear(), tau.abs().flatten(), free.flatten(), 0.1)
        saved = load_key_elements(lota_mask_path(tmp_path, stage, task))
        assert all(torch.equal(saved[n].linear(), method.mask[n].linear()) for n in saved)
        # A resumed task skips the calibration: its mask is on disk.
        assert method.phases(SETTINGS, stage, task, tmp_path) == [TRAIN]

        method.begin_phase(model, TRAIN, stage, task, tmp_path)
        model(**batch).loss.backward()  # the gradient outside the mask is zero (before clipping)
        for name, param in target_weights(model).items():
            keep = dense_mask(method.mask[name])
            assert not param.grad[~keep].any() and param.grad[keep].any(), name
        model.zero_grad(set_to_none=True)
        _train(method, model, batch, steps=3, weight_decay=0.1)  # decay would move every entry
        trained = _weights(model)
        moved = 0
        for name, w in trained.items():
            keep = dense_mask(method.mask[name])
            assert torch.equal(w[~keep], start[name][~keep]), name
            moved += int((w[keep] != start[name][keep]).sum())
        assert moved > 0.9 * sum(len(ke) for ke in method.mask.values())
        masks.append({n: dense_mask(ke) for n, ke in method.mask.items()})
        method.after_task(model, task, stage, tmp_path, write=True)
        model = method.finish_stage(model)
        assert not any(p.requires_grad for p in model.parameters())

    for name, first in masks[0].items():
        assert not (first & masks[1][name]).any(), name  # disjoint
        assert int(first.sum()) == int(masks[1][name].sum()) == int(0.1 * first.numel())
    # Resume: the state names the mask files; they reload into the same used positions.
    restored = build_method("lota", MethodConfig(lota_sparsity=0.9))
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())), tmp_path)
    assert restored.files == ["lota/stage01_A.safetensors", "lota/stage02_B.safetensors"]
    for name, ke in method.used.items():
        assert isinstance(restored.used[name], KeyElements)
        assert torch.equal(dense_mask(restored.used[name]), dense_mask(ke)), name
    assert method.describe()["lota_used_share"] == [0.2]


def test_lota_calibration_steps_follow_the_setting_or_the_task():
    method = build_method("lota", MethodConfig())
    assert method.sparsity == 0.9  # the paper's default
    cfg = SimpleNamespace(**{**vars(SETTINGS), "lota_calibration_steps": 5})
    assert method.phases(cfg, 1, "A", Path("/nonexistent"))[0].max_steps == 5
    cfg = SimpleNamespace(**{**vars(SETTINGS), "max_steps_for": lambda task: None, "epochs": 2.0})
    phase = method.phases(cfg, 1, "A", Path("/nonexistent"))[0]
    assert phase.max_steps is None and phase.epochs == pytest.approx(0.2)
    with pytest.raises(ValueError, match="sparsity"):
        build_method("lota", MethodConfig(lota_sparsity=1.0))
