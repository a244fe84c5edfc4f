"""`moelora` and `smolora` behind the method hooks: what trains, stage folders, instruction
routing, and real smoke runs that are killed and resumed."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from smoke_run import ARGS, run_smoke, smoke_env, warm_stage0

import sefe_fast.methods.moelora as moelora
from sefe_fast.data.char_tokenizer import build_char_tokenizer
from sefe_fast.methods import MethodConfig, build_method
from sefe_fast.model.mixture_attach import mixture_layers, mixture_parameters, routing_context
from sefe_fast.model.mixture_lora import MixtureLoRALinear
from sefe_fast.model.tiny import TinyConfig, build_tiny_model
from sefe_fast.train.cli import parse_config

SMALL = TinyConfig(text_layers=2, text_hidden=64, text_heads=2, text_intermediate=128)
CFG = SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0, lr=1e-2, projector_lr=1e-3)


def _tiny():
    bundle = build_tiny_model(SMALL, seed=0)
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    return bundle


def _method(name, experts=4):
    return build_method(name, MethodConfig(mixture_experts=experts))


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(5, 100, (2, 24))
    ids[:, 1:17] = 4
    labels = torch.full_like(ids, -100)
    labels[:, 18:] = ids[:, 18:]
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(2, 3, 32, 32),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }


def _train_one_step(method, model, task="TextVQA"):
    method.before_task(model, task, 1)
    groups = method.trainable_groups(model, CFG)
    optimizer = torch.optim.AdamW(groups)
    with torch.no_grad():  # B = 0 at start: give the experts an output to learn through
        for _, layer in mixture_layers(model):
            layer.lora_B.normal_(0, 0.05)
    model(**_batch()).loss.backward()
    optimizer.step()
    return groups


def test_moelora_trains_experts_routers_and_projector_and_keeps_them_across_tasks():
    bundle = _tiny()
    method = _method("moelora")
    model = method.attach(bundle.model, CFG)
    layers = mixture_layers(model)
    assert len(layers) == SMALL.text_layers * 7
    assert all(layer.routing == "dense" and layer.expert_rank == 2 for _, layer in layers)
    lora, proj = method.trainable_groups(model, CFG)
    assert lora["lr"] == CFG.lr and proj["lr"] == CFG.projector_lr
    assert len(lora["params"]) == len(layers) * 3  # A, B, router
    projector = model.model.multi_modal_projector
    assert {id(p) for p in proj["params"]} == {id(p) for p in projector.parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_one_step(method, model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_router." in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    assert all(".lora_" in n or "multi_modal_projector" in n for n in changed)
    # the end of a task keeps the experts (frozen); the next task continues from them
    finished = method.finish_stage(model)
    assert mixture_layers(finished) and not any(p.requires_grad for p in finished.parameters())
    state = {n: p.detach().clone() for n, p in finished.named_parameters()}
    again = method.attach(finished, CFG)
    assert all(torch.equal(p, state[n]) for n, p in again.named_parameters())
    assert len(mixture_parameters(again)) == len(layers) * 3


def test_moelora_stage_folder_roundtrip(tmp_path):
    method = _method("moelora")
    model = method.attach(_tiny().model, CFG)
    _train_one_step(method, model)
    expected = model(**_batch()).logits
    method.save_stage(model, tmp_path / "stage", write=True)
    files = sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert files == ["mixture.safetensors", "mixture_config.json", "projector.safetensors"]
    assert method.is_stage_saved(tmp_path / "stage")
    assert not method.is_stage_saved(tmp_path / "nothing")
    fresh = _method("moelora")
    loaded = fresh.finish_stage(fresh.load_stage(_tiny().model, tmp_path / "stage"))
    torch.testing.assert_close(loaded(**_batch()).logits, expected)


def test_a_rank_the_experts_do_not_divide_is_refused_naming_the_flags():
    with pytest.raises(ValueError, match="--lora-r 6 must be a multiple of --mixture-experts 4"):
        _method("moelora").attach(_tiny().model, SimpleNamespace(**{**vars(CFG), "lora_r": 6}))
    with pytest.raises(ValueError, match="even"):
        _method("smolora", experts=3).attach(
            _tiny().model, SimpleNamespace(**{**vars(CFG), "lora_r": 9})
        )


def test_bad_expert_counts_stop_the_run_at_the_flags(capsys):
    base = ["coin", "--preset", "smoke", "--output-dir", "unused"]
    with pytest.raises(SystemExit):
        parse_config([*base, "--method", "moelora", "--lora-r", "8", "--mixture-experts", "3"])
    assert "--lora-r 8 must be a multiple of --mixture-experts 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([*base, "--method", "smolora", "--lora-r", "9", "--mixture-experts", "3"])
    assert "an even number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config([*base, "--method", "smolora", "--lora-r", "12"])  # 8 experts by default
    assert "--mixture-experts 8" in capsys.readouterr().err
    config = parse_config(
        [*base, "--method", "moelora", "--lora-r", "12", "--mixture-experts", "3"]
    )
    assert config.mixture_experts == 3
    parse_config([*base, "--method", "lora", "--lora-r", "12"])  # other methods: no check
    with pytest.raises(SystemExit):
        parse_config([*base, "--method", "smolora", "--fsdp"])
    assert "--method smolora does not run with --fsdp" in capsys.readouterr().err


def test_mixtures_refuse_a_sharded_model(monkeypatch):
    monkeypatch.setattr(moelora, "is_sharded", lambda model: True)
    with pytest.raises(ValueError, match="--method smolora does not run with --fsdp"):
        _method("smolora").attach(_tiny().model, CFG)


def _smolora(bundle):
    method = _method("smolora")
    method.bind_model(bundle)
    return method, method.attach(bundle.model, CFG)


def test_smolora_targets_trainables_and_frozen_routers():
    method, model = _smolora(_tiny())
    names = [n for n, _ in mixture_layers(model)]
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "gate_proj",
        "up_proj",
        "down_proj",
        "linear_1",
        "linear_2",
    }
    assert len(names) == SMALL.text_layers * 3 + 2
    lora, proj = method.trainable_groups(model, CFG)
    named = {id(p): n for n, p in model.named_parameters()}
    assert all("multi_modal_projector" in named[id(p)] for p in proj["params"])
    assert all(".lora_" in named[id(p)] for p in proj["params"])  # base projector frozen
    trainable = {named[id(p)] for p in lora["params"] + proj["params"]}
    assert not any("_gate." in n for n in trainable)  # vu / ins gates never train
    assert any(".lora_fc_vu." in n for n in trainable)
    assert not method.shares_prompt_prefix
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_one_step(method, model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_fc_ins." in n for n in changed) and any(".lora_A" in n for n in changed)
    assert not any("_gate." in n or ".base_layer." in n for n in changed)


def test_smolora_instruction_embedding_is_the_mean_of_its_token_rows():
    bundle = _tiny()
    method, model = _smolora(bundle)
    method.before_predictions(model, "ScienceQA")
    got = routing_context(model).instruction
    text = "Answer with the option's letter from the given choices directly."
    table = model.get_input_embeddings().weight
    ids = build_char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    plain = sum(table[i].double() for i in ids) / len(ids)
    torch.testing.assert_close(got.double(), plain)
    # tasks that share an instruction share the embedding (official: one ins_type)
    method.before_predictions(model, "TextVQA")
    textvqa = routing_context(model).instruction.clone()
    method.before_task(model, "GQA", 3)
    assert torch.equal(routing_context(model).instruction, textvqa)
    assert not torch.equal(textvqa, got)


def test_smolora_stage_folder_holds_no_projector_and_roundtrips(tmp_path):
    bundle = _tiny()
    method, model = _smolora(bundle)
    _train_one_step(method, model)
    method.before_predictions(model, "TextVQA")
    expected = model(**_batch()).logits
    method.save_stage(model, tmp_path / "s", write=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "mixture.safetensors",
        "mixture_config.json",
    ]
    other_bundle = _tiny()
    other = _method("smolora")
    other.bind_model(other_bundle)
    loaded = other.finish_stage(other.load_stage(other_bundle.model, tmp_path / "s"))
    other.before_predictions(loaded, "TextVQA")
    torch.testing.assert_close(loaded(**_batch()).logits, expected)
    assert all(isinstance(m, MixtureLoRALinear) for _, m in mixture_layers(loaded))


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return warm_stage0(tmp_path_factory.mktemp("cache"))


def _mixtures(run):
    return {
        d.name: load_file(d / "mixture.safetensors") for d in sorted((run / "adapters").iterdir())
    }


def _predictions(run):
    return {
        str(p.relative_to(run)): p.read_text()
        for p in sorted((run / "predictions").rglob("*.jsonl"))
    }


@pytest.mark.parametrize("method", ["moelora", "smolora"])
def test_smoke_run_killed_then_resumed_equals_uninterrupted(tmp_path, cache, method):
    full = run_smoke(tmp_path / "full", cache, "--method", method, "--mixture-experts", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["config"]["method_detail"]["experts"] == 4
    # killed in task 2 at step 3 (its checkpoint at step 2 exists)
    extra = ("--method", method, "--mixture-experts", "4")
    killed = run_smoke(tmp_path / "resumed", cache, *extra, fail_after=7)
    assert killed.returncode == 86, killed.stderr[-3000:]
    resumed = run_smoke(tmp_path / "resumed", cache, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming TextVQA from step 2" in resumed.stdout
    again = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert again["accuracy"] == results["accuracy"]
    assert _predictions(tmp_path / "full") == _predictions(tmp_path / "resumed")
    a, b = _mixtures(tmp_path / "full"), _mixtures(tmp_path / "resumed")
    assert a.keys() == b.keys() == {"stage01_ScienceQA", "stage02_TextVQA"}
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for key in a[stage]:
            assert torch.equal(a[stage][key], b[stage][key]), (stage, key)
    # the experts were trained further in task 2, not replaced
    first, second = a["stage01_ScienceQA"], a["stage02_TextVQA"]
    key = next(k for k in first if k.endswith("lora_B"))
    assert first[key].abs().max() > 0 and not torch.equal(first[key], second[key])


@pytest.mark.parametrize("method", ["moelora", "smolora"])
def test_smoke_run_under_torchrun_with_two_processes(tmp_path, cache, method):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "sefe_fast.train", *ARGS, "--per-device-batch-size", "2",
        "--method", method, "--mixture-experts", "4", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**smoke_env(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["world_size"] == 2 and results["method"] == method
    assert results["accuracy"][1][0] is not None and results["accuracy"][1][1] is not None
    n_test = len(json.loads((out / "minicoin" / "TextVQA" / "test.json").read_text()))
    rows = (out / "predictions" / "stage02_TextVQA" / "TextVQA.jsonl").read_text().splitlines()
    assert len(rows) == n_test  # gathered from both ranks
    mixtures = _mixtures(out)
    assert all(
        t.abs().max() > 0 for m in mixtures.values() for k, t in m.items() if k.endswith("lora_B")
    )
