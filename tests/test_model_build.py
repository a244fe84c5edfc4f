"""Assembling LLaVA the CoIN way (LLM + CLIP + projector file) and loading a HF LLaVA."""

import pytest
import torch
from tiny_hf_llava import write_llava_parts
from transformers import PreTrainedTokenizerFast

from sefe_fast.model.accel import AccelConfig, attention_implementation, compute_dtype
from sefe_fast.model.build import assemble_llava, load_llava, load_projector_state


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny random LLM dir (tokenizer without <image>), CLIP dir and LLaVA projector file."""
    saved = write_llava_parts(tmp_path_factory.mktemp("parts"))
    assert "<image>" not in PreTrainedTokenizerFast.from_pretrained(saved.root / "llm").get_vocab()
    return saved.root, saved.llm, saved.vision, saved.projector


def test_assembled_llava_holds_the_parts(parts):
    root, llm, vision, projector = parts
    bundle = assemble_llava(root / "llm", root / "clip", root / "mm_projector.bin")
    model = bundle.model
    config = model.config
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu"
    assert bundle.num_image_tokens == 16  # (32 / 8)², CLS dropped
    proj = model.model.multi_modal_projector
    torch.testing.assert_close(proj.linear_1.weight, projector["model.mm_projector.0.weight"])
    torch.testing.assert_close(proj.linear_2.bias, projector["model.mm_projector.2.bias"])
    torch.testing.assert_close(
        model.model.language_model.layers[1].mlp.up_proj.weight,
        llm.model.layers[1].mlp.up_proj.weight,
    )
    tower, source = model.model.vision_tower.state_dict(), vision.state_dict()
    assert tower.keys() == source.keys()
    for key in source:
        torch.testing.assert_close(tower[key], source[key])
    # <image> was added to the tokenizer and the embedding grew by one row.
    assert bundle.image_token_id == len(bundle.tokenizer) - 1
    assert model.get_input_embeddings().weight.shape[0] == len(bundle.tokenizer)


def test_assembled_forward_uses_the_second_to_last_vision_layer(parts):
    root, _, vision, projector = parts
    bundle = assemble_llava(root / "llm", root / "clip", root / "mm_projector.bin")
    model = bundle.model.eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        hidden = vision(pixels, output_hidden_states=True).hidden_states[-2][0, 1:]
        w1, b1 = projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"]
        w2, b2 = projector["model.mm_projector.2.weight"], projector["model.mm_projector.2.bias"]
        expected = torch.nn.functional.gelu(hidden @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[1] + [bundle.image_token_id] * 16 + [40, 41]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape == (1, 19, len(bundle.tokenizer))


def test_saved_llava_loads_back_with_the_same_outputs(parts, tmp_path):
    root = parts[0]
    bundle = assemble_llava(root / "llm", root / "clip", root / "mm_projector.bin")
    bundle.model.save_pretrained(tmp_path / "llava")
    bundle.tokenizer.save_pretrained(tmp_path / "llava")
    bundle.image_processor.save_pretrained(tmp_path / "llava")
    loaded = load_llava(tmp_path / "llava")
    ids = torch.tensor([[1] + [bundle.image_token_id] * 16 + [40, 41]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = bundle.model.eval()(input_ids=ids, pixel_values=pixels).logits
        b = loaded.model.eval()(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(a, b)
    assert loaded.image_token_id == bundle.image_token_id
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_llava(tmp_path / "nowhere")


def test_projector_file_errors_name_the_key(tmp_path):
    torch.save({"model.mm_projector.5.weight": torch.zeros(1)}, tmp_path / "p.bin")
    with pytest.raises(ValueError, match=r"mm_projector\.5\.weight"):
        load_projector_state(tmp_path / "p.bin")


def test_cpu_uses_sdpa_and_fp32():
    cpu = torch.device("cpu")
    assert attention_implementation(AccelConfig(), cpu) == "sdpa"
    assert compute_dtype(AccelConfig(), cpu) == torch.float32
