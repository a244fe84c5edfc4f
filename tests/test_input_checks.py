"""Issue 22, items 9 and 10: bad input is found before training, or named clearly."""

import errno
import json
import shutil

import pytest
import torch
from PIL import Image
from smoke_run import run_smoke, warm_stage0

from sefe_fast.data.coin import CoinDataError, load_train_dataset
from sefe_fast.data.minicoin import generate_minicoin
from sefe_fast.io_utils import DiskFullError, atomic_path
from sefe_fast.model.accel import AccelConfig
from sefe_fast.model.tiny import TinyConfig, build_tiny_model
from sefe_fast.train.config import RunConfig
from sefe_fast.train.distributed import DistContext
from sefe_fast.train.stage_eval import BadTestSetError, StageEvaluator

DIST = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = TinyConfig(text_layers=1, text_hidden=32, text_heads=2, text_intermediate=64)


def _data(root, task, records, image_bytes=None):
    """<root>/<task>/test.json with `records`; every record's image is a real 32-px PNG
    (or `image_bytes` when given)."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "img.png")
    if image_bytes is not None:
        (folder / "img.png").write_bytes(image_bytes)
    (folder / "test.json").write_text(json.dumps(records))
    return root


def _record(qid, text="Which colour? A. red B. blue", answer="A"):
    return {"question_id": qid, "image": "ScienceQA/img.png", "text": text, "answer": answer}


def _check(root, **settings):
    cfg = RunConfig(model="tiny", tasks=["ScienceQA"], **settings)
    bundle = build_tiny_model(SMALL, seed=0)
    StageEvaluator(cfg, DIST, bundle, root, root, AccelConfig(), False).check_test_sets(
        ["ScienceQA"]
    )


def test_a_good_test_file_passes(tmp_path):
    _check(_data(tmp_path, "ScienceQA", [_record("q1"), _record("q2")]))


@pytest.mark.parametrize(
    ("records", "settings", "message"),
    [
        ([_record("q1"), _record("q1")], {}, r"record 'q1': question_id repeated"),
        ([_record("q1"), _record("q2", answer="banana")], {}, r"'q2': the scorer cannot read"),
        ([_record("q1", text="why? " * 400)], {"max_length": 768}, r"'q1': its prompt is \d+ tok"),
        ([], {}, r"test\.json: no test records"),
    ],
)
def test_bad_test_files_are_named_before_training(tmp_path, records, settings, message):
    with pytest.raises(BadTestSetError, match=message):
        _check(_data(tmp_path, "ScienceQA", records), **settings)


def test_a_truncated_test_image_is_found_up_front(tmp_path):
    png = tmp_path / "full.png"
    Image.effect_noise((32, 32), 64).convert("RGB").save(png)
    cut = png.read_bytes()[: len(png.read_bytes()) // 2]  # header intact, pixels cut short
    root = _data(tmp_path / "d", "ScienceQA", [_record("q1")], image_bytes=cut)
    with pytest.raises(BadTestSetError, match=r"test\.json: record 'q1': .*img\.png"):
        _check(root)


def test_run_with_a_truncated_test_image_stops_before_the_first_task(tmp_path):
    cache = warm_stage0(tmp_path / "cache")
    run = tmp_path / "R"
    # The mini-CoIN a smoke run generates (same parameters: the run reuses it).
    data = generate_minicoin(run / "minicoin", seed=0, n_train=24, n_test=8, n_stage0=1)
    record = json.loads((data / "TextVQA" / "test.json").read_text())[3]
    image = data / record["image"]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])

    failed = run_smoke(run, cache)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"TextVQA/test.json: record '{record['question_id']}'" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (run / "adapters").exists() and not (run / "train_log.jsonl").exists()


# ---------------------------------------------------------------- 10: training input, disk


def _train_file(root, questions, images):
    """<root>/train.json: one record per (question, image name); images under root."""
    records = [
        {
            "id": f"r{n}",
            "image": image,
            "conversations": [
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for n, (question, image) in enumerate(zip(questions, images))
    ]
    (root / "train.json").write_text(json.dumps(records, ensure_ascii=False))
    return root / "train.json"


def _load(path, **kwargs):
    bundle = build_tiny_model(SMALL, seed=0)
    return load_train_dataset(
        path,
        path.parent,
        bundle.tokenizer,
        bundle.image_processor,
        image_token_id=bundle.image_token_id,
        num_image_tokens=bundle.num_image_tokens,
        max_length=768,
        **kwargs,
    )


def _images(root):
    Image.effect_noise((32, 32), 64).convert("RGB").save(root / "good.png")
    data = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])


def test_empty_training_file_is_named(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(CoinDataError, match=r"train\.json: the training file holds no records"):
        _load(tmp_path / "train.json")


def test_truncated_training_image_is_skipped_up_front_or_named_when_used(tmp_path):
    _images(tmp_path)
    path = _train_file(tmp_path, ["Colour?", "Colour?"], ["good.png", "cut.png"])
    dataset, stats = _load(path, skip_bad=True)  # --skip-bad decodes every image now
    assert (len(dataset), stats.n_bad_skipped) == (1, 1)
    assert "cut.png" in stats.skipped_reasons[0]
    dataset, _ = _load(path)  # header check only: it passes, and fails clearly when used
    with pytest.raises(CoinDataError, match=r"cut\.png: .*--skip-bad"):
        dataset[1]


def test_characters_outside_the_vocabulary_are_counted(tmp_path):
    _images(tmp_path)
    path = _train_file(tmp_path, ["Couleur ? été", "Colour?"], ["good.png", "good.png"])
    _, stats = _load(path)
    assert (stats.n_unknown_tokens, stats.n_records_with_unknown) == (2, 1)
    assert "2 characters unknown to the tokenizer (in 1 records)" in stats.summary()


def _failing_write(target, error):
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise error


def test_a_full_disk_is_reported_as_such_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    enospc = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*ckpt\.pt"):
        _failing_write(target, enospc)
    # torch.save on a full disk says "unexpected pos ...": judged by the free space left.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=4096))
    with pytest.raises(DiskFullError, match="unexpected pos 128"):
        _failing_write(target, RuntimeError("unexpected pos 128 vs 64"))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unrelated"):  # plenty of space: not the disk
        _failing_write(target, RuntimeError("unrelated"))
