"""Presets and flags → RunConfig."""

import pytest

from sefe_fast.model.tiny import Stage0Config
from sefe_fast.tasks import COIN_TASKS
from sefe_fast.train.cli import parse_config
from sefe_fast.train.presets import PRESETS


def test_default_preset_is_sefe_on_all_tasks_with_paper_method_settings():
    cfg = parse_config(["coin"])
    assert cfg.model == "tiny" and cfg.data is None
    assert cfg.method == "sefe" and cfg.tasks == list(COIN_TASKS)
    # M and X are the paper's; λ is rescaled to the tiny model's learning rate (presets.py)
    assert (cfg.reg_lambda, cfg.mask_ratio, cfg.asd_ratio) == (2.5e2, 0.02, 0.2)
    assert parse_config(["coin", "--reg-lambda", "2500"]).reg_lambda == 2.5e3
    assert cfg.stage0_steps is None  # the shipped stage-0 weights
    assert Stage0Config().steps > 0


def test_flags_override_the_preset():
    cfg = parse_config(
        ["coin", "--preset", "smoke", "--method", "lora", "--lr", "0.5", "--tasks", "GQA,VizWiz"]
    )
    assert cfg.method == "lora" and cfg.lr == 0.5 and cfg.tasks == ["GQA", "VizWiz"]
    assert cfg.max_steps == PRESETS["smoke"]["max_steps"]
    assert not parse_config(["coin", "--no-liger", "--no-flash-attn"]).liger
    assert parse_config(["coin", "--fsdp"]).fsdp and not parse_config(["coin"]).fsdp


def test_paper_preset_has_the_papers_recipe_and_needs_a_model_and_data(capsys):
    with pytest.raises(SystemExit):
        parse_config(["coin", "--preset", "paper"])
    assert "needs --model" in capsys.readouterr().err
    cfg = parse_config(["coin", "--preset", "paper", "--model", "m", "--data", "d"])
    assert (cfg.lr, cfg.projector_lr, cfg.lora_r, cfg.lora_alpha) == (2e-4, 2e-5, 128, 256)
    assert (cfg.global_batch_size, cfg.max_length, cfg.epochs, cfg.warmup_ratio) == (
        128,
        2048,
        1.0,
        0.03,
    )
    assert cfg.lora_dropout == 0.05 and cfg.weight_decay == 0.0 and cfg.max_steps is None
    assert (cfg.reg_lambda, cfg.mask_ratio, cfg.asd_ratio, cfg.task_steps) == (2.5e3, 0.02, 0.2, {})
    assembled = parse_config(
        ["coin", "--preset", "paper", "--llm", "v", "--vision-tower", "c", "--data", "d"]
    )
    assert assembled.model is None and assembled.llm == "v"


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        parse_config(["coin", "--tasks", "GQA,Foo"])
    assert "Foo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["coin", "--data", "somewhere"])  # the tiny model only knows mini-CoIN
    assert "tiny model" in capsys.readouterr().err


def test_task_steps_override_max_steps_for_the_named_tasks(capsys):
    cfg = parse_config(["coin", "--max-steps", "50", "--task-steps", "GQA=120, OCRVQA=90"])
    assert cfg.task_steps == {"GQA": 120, "OCRVQA": 90}
    assert [cfg.max_steps_for(t) for t in ("GQA", "OCRVQA", "VizWiz")] == [120, 90, 50]
    # A step count given alone is for every task: the preset's per-task budgets are dropped.
    preset = parse_config(["coin"])
    assert parse_config(["coin", "--max-steps", "7"]).task_steps == {}
    assert parse_config(["coin", "--epochs", "1"]).max_steps_for("GQA") == preset.max_steps
    assert parse_config(["coin", "--task-steps", ""]).task_steps == {}
    assert preset.task_steps is not PRESETS["default"]["task_steps"]  # a copy, not the preset
    for bad, named in (
        ("GQA", "'GQA'"),
        ("Foo=3", "Foo"),
        ("GQA=-1", "GQA=-1"),
        ("GQA=0", "GQA=0"),
    ):
        with pytest.raises(SystemExit):
            parse_config(["coin", "--task-steps", bad])
        assert named in capsys.readouterr().err
