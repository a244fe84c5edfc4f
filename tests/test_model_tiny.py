"""The tiny LLaVA preset: its shape, stage-0 pretraining, and the weight cache."""

import json

import pytest
import torch

from sefe_fast.data.minicoin import MINICOIN_IMAGE_SIZE
from sefe_fast.model import tiny
from sefe_fast.model.tiny import (
    Stage0Config,
    TinyConfig,
    build_tiny_model,
    stage0_fingerprint,
)
from sefe_fast.train import stage0
from sefe_fast.train.distributed import DistContext
from sefe_fast.train.stage0 import load_or_pretrain_tiny

DIST = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
QUICK = Stage0Config(
    steps=3, batch_size=4, n_train=16, max_length=512, vision_steps=3, vision_batch_size=8
)


def test_tiny_model_matches_minicoin_and_the_char_tokenizer():
    bundle = build_tiny_model(TinyConfig(), seed=0)
    config = bundle.model.config
    assert config.vision_config.image_size == MINICOIN_IMAGE_SIZE
    assert bundle.num_image_tokens == (MINICOIN_IMAGE_SIZE // 8) ** 2
    assert config.text_config.vocab_size == len(bundle.tokenizer)
    assert config.text_config.num_hidden_layers == 4 and config.text_config.hidden_size == 128
    assert config.vision_config.num_hidden_layers == 2 and config.vision_config.hidden_size == 64
    assert bundle.image_token_id == bundle.tokenizer.convert_tokens_to_ids("<image>")
    n_params = sum(p.numel() for p in bundle.model.parameters())
    assert 0.5e6 < n_params < 2e6
    pixels = bundle.image_processor(
        images=torch.zeros(3, 32, 32, dtype=torch.uint8).numpy().transpose(1, 2, 0),
        return_tensors="pt",
    )["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, MINICOIN_IMAGE_SIZE, MINICOIN_IMAGE_SIZE)


def test_stage0_trains_every_weight_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFE_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "ASSET_DIR", tmp_path / "no-asset")
    bundle = load_or_pretrain_tiny(DIST, TinyConfig(), QUICK)
    entry = tmp_path / f"tiny-stage0-{stage0_fingerprint(TinyConfig(), QUICK)}"
    meta = json.loads((entry / "stage0.json").read_text())
    assert meta["fingerprint"] == stage0_fingerprint(TinyConfig(), QUICK)
    assert 0.0 <= meta["vision_tower"]["cell_accuracy"] <= 1.0  # stage 0a's held-out report
    assert not (tmp_path / f"{entry.name}.ckpt.pt").exists()  # removed when finished
    init = build_tiny_model(TinyConfig(), seed=QUICK.train_seed).model.state_dict()
    trained = bundle.model.state_dict()
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        keys = [k for k in init if part in k]
        assert keys and any(not torch.equal(init[k], trained[k]) for k in keys), part

    # A second call loads the cache instead of training again.
    def fail(*args, **kwargs):
        raise AssertionError("stage 0 should have been loaded from the cache")

    monkeypatch.setattr(stage0, "pretrain_stage0", fail)
    again = load_or_pretrain_tiny(DIST, TinyConfig(), QUICK)
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, trained[key])
    # Another stage-0 config has another fingerprint: the cache entry is not reused.
    with pytest.raises(AssertionError, match="loaded from the cache"):
        load_or_pretrain_tiny(
            DIST, TinyConfig(), Stage0Config(steps=4, batch_size=4, n_train=16, vision_steps=3)
        )


def test_shipped_asset_matches_the_current_stage0_settings():
    """A change to the tiny model, Stage0Config or the stage-0 data (STAGE0_VERSION) must come
    with a rebuilt asset (README: the rebuild command), else every run retrains stage 0."""
    meta = json.loads((tiny.ASSET_DIR / tiny.STAGE0_META).read_text())
    assert meta["fingerprint"] == stage0_fingerprint(TinyConfig(), Stage0Config()), (
        "sefe_fast/assets/tiny-stage0 is stale: rebuild it (README, 'The tiny LLaVA')"
    )
    assert (tiny.ASSET_DIR / "model.safetensors").is_file()


def test_resumed_stage0_keeps_the_trained_vision_tower(tmp_path, monkeypatch):
    """An interrupted stage 0b resumes without training stage 0a's tower again."""
    out = tmp_path / "stage0"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage0, "train_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage0.pretrain_stage0(out, TinyConfig(), QUICK, DIST, data_root=tmp_path / "data")
    tower_file = tmp_path / "stage0.tower.pt"
    saved = torch.load(tower_file, weights_only=False)
    assert saved["fingerprint"] == stage0_fingerprint(TinyConfig(), QUICK)

    def retrain(*args, **kwargs):
        raise AssertionError("stage 0a ran again on resume")

    monkeypatch.undo()
    monkeypatch.setattr(stage0, "pretrain_vision_tower", retrain)
    stage0.pretrain_stage0(out, TinyConfig(), QUICK, DIST, data_root=tmp_path / "data")
    loaded = tiny.load_tiny_from(out, TinyConfig()).model.model.vision_tower.state_dict()
    for key, value in saved["tower"].items():
        assert torch.equal(loaded[key], value), key
    assert not tower_file.exists()  # removed when stage 0 finished
