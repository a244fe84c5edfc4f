"""Presets and flags → RunConfig."""

import pytest

from sefe_fast import paper_defaults
from sefe_fast.methods import METHODS, ContinualMethod, MethodConfig
from sefe_fast.methods.fft import weight_lr
from sefe_fast.model.tiny import Stage0Config
from sefe_fast.tasks import COIN_TASKS
from sefe_fast.train import cli
from sefe_fast.train.cli import parse_config
from sefe_fast.train.config import check_overrides, default_value, settings, validate
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


def test_fft_weight_lr_is_lr_over_ten_except_where_a_preset_or_flag_sets_it():
    default = parse_config(["coin", "--method", "fft"])
    assert weight_lr(default) == pytest.approx(default.lr / 10)
    assert weight_lr(parse_config(["coin", "--preset", "smol", "--method", "fft"])) == 2e-5
    flagged = parse_config(["coin", "--preset", "smol", "--method", "fft", "--fft-lr", "1e-6"])
    assert weight_lr(flagged) == 1e-6


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


# Each line: the flags given | the error they must give (one per problem, naming the flag).
BAD_VALUES = """
--lr -1 | --lr -1.0: must be > 0
--lr nan | --lr nan: must be a finite number
--reg-lambda -1 | --reg-lambda -1.0: must be >= 0
--warmup-ratio 5 | --warmup-ratio 5.0: must be >= 0 and <= 1
--mask-ratio 0 | --mask-ratio 0.0: must be > 0 and <= 1
--mask-ratio 2 | --mask-ratio 2.0: must be > 0 and <= 1
--eval-batch-size 0 | --eval-batch-size 0: must be >= 1
--max-test-per-task 0 | --max-test-per-task 0: must be >= 1
--global-batch-size 0 | --global-batch-size 0: must be >= 1
--log-every 0 | --log-every 0: must be >= 1
--lora-dropout 1 | --lora-dropout 1.0: must be >= 0 and < 1
--epochs inf | --epochs inf: must be a finite number
--save-every -2 | --save-every -2: must be >= 0
"""


@pytest.mark.parametrize("line", BAD_VALUES.strip().splitlines())
def test_every_bad_value_is_an_error_before_any_work(line, capsys, monkeypatch):
    flags, named = (part.strip() for part in line.split("|"))
    argv = flags.split()
    started = []
    monkeypatch.setattr(cli, "run_continual", started.append)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["coin", *argv])
    assert exit_info.value.code == 2 and not started
    assert f"error: {named}" in capsys.readouterr().err


def test_all_problems_are_reported_at_once(capsys):
    with pytest.raises(SystemExit):
        parse_config(["coin", "--lr", "-1", "--mask-ratio", "2", "--log-every", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 3
    assert [e.split("error: ")[1].split()[0] for e in errors] == [
        "--lr",
        "--mask-ratio",
        "--log-every",
    ]


def test_presets_are_overrides_of_known_settings_with_valid_values():
    for name, overrides in PRESETS.items():
        check_overrides(overrides, name)  # raises for an unknown key
        values = {n: default_value(f) for n, (f, _) in settings().items()}
        assert validate({**values, **overrides}) == [], name
    with pytest.raises(ValueError, match="preset 'x': unknown setting 'reg_lamda'"):
        check_overrides({"reg_lamda": 1.0, "lr": 1e-3}, "preset 'x'")
    with pytest.raises(ValueError, match="'output_dir' is given on the command line"):
        check_overrides({"output_dir": "elsewhere"}, "preset 'x'")


def test_a_misspelled_preset_key_stops_the_run(monkeypatch):
    monkeypatch.setitem(PRESETS, "typo", {"reg_lamda": 1.0})
    with pytest.raises(ValueError, match="preset 'typo': unknown setting 'reg_lamda'"):
        cli._preset_values("typo")


def test_the_papers_defaults_are_runconfigs_defaults():
    defaults = {n: default_value(f) for n, (f, _) in settings().items()}
    assert (defaults["reg_lambda"], defaults["mask_ratio"], defaults["asd_ratio"]) == (
        paper_defaults.REG_LAMBDA,
        paper_defaults.MASK_RATIO,
        paper_defaults.ASD_RATIO,
    )
    assert MethodConfig().reg_lambda == paper_defaults.REG_LAMBDA == 2.5e3
    # every flag has help text, and a range where it is a number
    help_text = cli.build_parser().format_help()
    assert "--reg-lambda" in help_text and "--no-liger" in help_text and ">= 0" in help_text


def test_help_lists_every_method_with_its_one_line_summary():
    lines = cli.build_parser().format_help().split("methods (--method):\n", 1)[1].splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHODS)
    for line in lines:
        name = line.split()[0]
        assert line.split(None, 1)[1] == METHODS[name].summary != ContinualMethod.summary


def test_a_method_without_fsdp_support_is_refused_with_fsdp(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["coin", "--preset", "smoke", "--method", "lota", "--fsdp"])
    assert exit_info.value.code == 2
    assert "--method lota does not run with --fsdp" in capsys.readouterr().err
    assert parse_config(["coin", "--preset", "smoke", "--method", "fft", "--fsdp"]).fsdp
