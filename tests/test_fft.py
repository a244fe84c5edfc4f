"""`fft`: which weights a full fine-tune trains (against a plain-torch reference), at what lr,
and its saved stage (safetensors under the model's names) read back exactly."""

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import _tiny_batch

from sefe_fast.methods import MethodConfig, build_method
from sefe_fast.methods.fft import WEIGHTS_FILE, weight_lr
from sefe_fast.model.full_weights import WeightsFileError, save_weights

SETTINGS = SimpleNamespace(
    lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lr=3e-3, projector_lr=2e-3, fft_lr=None
)


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _step(model, groups, batch):
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    model(**batch).loss.backward()
    optimizer.step()


def test_fft_trains_the_llm_and_projector_only_like_a_plain_reference():
    bundle, batch = _tiny_batch()
    model = _frozen(bundle.model)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("fft", MethodConfig())
    trained = method.attach(model, SETTINGS)
    assert trained is model  # no adapter: the model itself trains
    groups = method.trainable_groups(trained, SETTINGS)
    assert [(g["name"], g["lr"]) for g in groups] == [("llm", pytest.approx(3e-4)), ("proj", 2e-3)]
    _step(trained, groups, batch)

    # The rule in plain torch: everything but the vision tower trains; the projector at its lr.
    names = [n for n, _ in reference.named_parameters()]
    llm = [
        p
        for n, p in reference.named_parameters()
        if "language_model" in n or n.startswith("lm_head")
    ]
    proj = [p for n, p in reference.named_parameters() if "multi_modal_projector" in n]
    assert len(llm) + len(proj) + sum("vision_tower" in n for n in names) == len(names)
    for p in llm + proj:
        p.requires_grad_(True)
    _step(reference, [{"params": llm, "lr": 3e-4}, {"params": proj, "lr": 2e-3}], batch)

    after = dict(trained.named_parameters())
    for name, ref in reference.named_parameters():
        torch.testing.assert_close(after[name], ref, rtol=0, atol=0, msg=name)
        moved = not torch.equal(after[name], before[name])
        assert moved == ("vision_tower" not in name), name
    done = method.finish_stage(trained)
    assert done is trained and not any(p.requires_grad for p in done.parameters())


def test_fft_lr_is_the_setting_or_a_tenth_of_the_lora_lr():
    assert weight_lr(SETTINGS) == pytest.approx(3e-4)
    assert weight_lr(SimpleNamespace(lr=2e-4, fft_lr=None)) == pytest.approx(2e-5)  # paper
    assert weight_lr(SimpleNamespace(lr=2e-4, fft_lr=1e-5)) == 1e-5


def test_fft_stage_is_saved_as_safetensors_and_replays_exactly(tmp_path):
    bundle, batch = _tiny_batch()
    method = build_method("fft", MethodConfig())
    trained = method.attach(_frozen(bundle.model), SETTINGS)
    _step(trained, method.trainable_groups(trained, SETTINGS), batch)
    directory = tmp_path / "adapters" / "stage01_T"
    assert not method.is_stage_saved(directory)
    method.save_stage(trained, directory, write=False)  # not rank 0: nothing written
    assert not directory.exists()
    method.save_stage(trained, directory, write=True)
    assert method.is_stage_saved(directory)
    done = method.finish_stage(trained)

    # Anything that reads safetensors gets the trained weights under the model's own names.
    fresh = _frozen(_tiny_batch()[0].model)
    tensors = load_file(directory / WEIGHTS_FILE)
    assert not any("vision_tower" in n for n in tensors)
    assert any("multi_modal_projector" in n for n in tensors)
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert not unexpected and all("vision_tower" in n for n in missing)

    replayed = method.finish_stage(method.load_stage(_frozen(_tiny_batch()[0].model), directory))
    reference = dict(done.named_parameters())
    for name, param in replayed.named_parameters():
        torch.testing.assert_close(param, reference[name], rtol=0, atol=0, msg=name)

    # A file that does not fit the model names the file and the matrix.
    name = next(n for n in tensors if n.endswith("lm_head.weight"))
    bad = dict(tensors, **{name: tensors[name][:-1]})
    save_weights(bad, directory / WEIGHTS_FILE, True, {"method": "fft"})
    with pytest.raises(WeightsFileError, match=r"weights.safetensors: matrix 'lm_head.weight'"):
        method.load_stage(_frozen(_tiny_batch()[0].model), directory)
