"""A resume whose training images changed: refused mid-epoch (or the epoch restarted with
``--restart-epoch``), a warning at an epoch boundary; the record a checkpoint keeps of its data.

Sized for speed: 8 training images in batches of 4 at 64 pixels, 2 validation images, the tiny
model, one epoch (two steps) interrupted after its first step.
"""

import dataclasses
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import yolo.build
from utils.demo import generate_demo_dataset
from utils.loader import data_record
from yolo.checkpoint import load_checkpoint
from yolo.config import TrainConfig
from yolo.train import fit


@pytest.fixture
def data(tmp_path) -> Path:
    """This test's own demo set (the tests change its train split)."""
    return generate_demo_dataset(
        tmp_path / "data", num_train=8, num_val=2, min_size=64, max_size=96, seed=0
    )


def make_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(
        model="tiny", run="t", data_root=str(data), classes=str(data / "demo_classes.txt"),
        train_sets=("demo:train",), val_set="demo:val", img_size=64, eval_img_size=64,
        multi_scale=False, optimizer="adamw", batch_size=4, accum=1, workers=0, epochs=1,
        device="cpu", num_vis_images=0, log_dir=str(tmp_path / "logs"),
        model_dir=str(tmp_path / "model"),
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def interrupted_after_one_step(tmp_path: Path, data: Path, monkeypatch) -> TrainConfig:
    """A run stopped (SIGINT) after its first step: last.pt is 4 images into epoch 1."""
    build, calls = yolo.build.build_train_model, {"n": 0}

    def hook(module, args, output):
        calls["n"] += module.training
        if module.training and calls["n"] == 1:
            signal.raise_signal(signal.SIGINT)

    def patched(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(yolo.build, "build_train_model", patched)
    config = make_config(tmp_path, data)
    assert fit(config)["interrupted"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "model/t/last.pt")["state"]["epoch_images"] == 4
    return dataclasses.replace(config, resume="last")


def split_file(data: Path) -> Path:
    return data / "VOCdemo/ImageSets/Main/train.txt"


def append_images(data: Path, count: int) -> None:
    """Append ``count`` ids to the train split: copies of existing images under new names."""
    folder, ids = data / "VOCdemo", split_file(data).read_text().split()
    for number, source in enumerate(ids[:count]):
        new = f"extra{number}"
        shutil.copy(folder / "JPEGImages" / f"{source}.jpg", folder / "JPEGImages" / f"{new}.jpg")
        shutil.copy(folder / "Annotations" / f"{source}.xml", folder / "Annotations" / f"{new}.xml")
        ids.append(new)
    split_file(data).write_text("".join(f"{image_id}\n" for image_id in ids))


def test_appended_images_refuse_a_mid_epoch_resume_or_restart_the_epoch(
    tmp_path, data, monkeypatch, caplog
):
    config = interrupted_after_one_step(tmp_path, data, monkeypatch)
    before = (tmp_path / "model/t/last.pt").read_bytes()
    append_images(data, 4)
    with pytest.raises(ValueError) as error:
        fit(config)
    message = str(error.value)
    assert "the train split holds 12 images, the run trained on 8 (digest sha256:" in message
    assert message.endswith("resume with --restart-epoch to start epoch 1 again on the new data")
    assert "\n" not in message
    assert (tmp_path / "model/t/last.pt").read_bytes() == before  # nothing trained or written

    summary = fit(dataclasses.replace(config, restart_epoch=True))
    assert summary["finished"]
    assert "epoch 1 starts again on the new data (--restart-epoch)" in caplog.text
    saved = load_checkpoint(tmp_path / "model/t/last.pt")
    # the step before the stop, then the whole epoch again on 12 images: 3 steps
    assert (saved["state"]["iteration"], saved["state"]["seen"]) == (4, 16)
    assert saved["data"]["train"]["images"] == 12
    assert saved["data"]["val"] == data_record_of(data, "val")


def data_record_of(data: Path, split: str) -> dict:
    from utils.data import VOCDataset

    classes = (data / "demo_classes.txt").read_text().split()
    return data_record(VOCDataset(data, [("demo", split)], classes), classes)


def test_removed_images_name_the_change_instead_of_a_sampler_error(tmp_path, data, monkeypatch):
    config = interrupted_after_one_step(tmp_path, data, monkeypatch)
    ids = split_file(data).read_text().split()
    split_file(data).write_text("".join(f"{image_id}\n" for image_id in ids[:2]))
    with pytest.raises(ValueError, match=r"train split holds 2 images, the run trained on 8 .*"
                       r"restore the data, or resume with --restart-epoch"):  # fmt: skip
        fit(config)
    assert fit(dataclasses.replace(config, restart_epoch=True))["finished"]
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    assert (state["iteration"], state["seen"]) == (2, 6)  # 1 step of 4, then 1 step of 2


def test_changed_data_at_an_epoch_boundary_warns_and_trains_on(tmp_path, data, caplog):
    config = make_config(tmp_path, data)
    fit(config)
    append_images(data, 4)
    fit(dataclasses.replace(config, epochs=2, resume="last"))
    assert "the train split holds 12 images, the run trained on 8" in caplog.text
    assert "epoch 2 trains on the new data" in caplog.text
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    assert (state["epoch"], state["seen"]) == (2, 8 + 12)


def test_unchanged_data_resumes_mid_epoch_without_a_word(tmp_path, data, monkeypatch, caplog):
    config = interrupted_after_one_step(tmp_path, data, monkeypatch)
    caplog.clear()
    fit(dataclasses.replace(config, restart_epoch=True))  # nothing changed: nothing restarts
    assert "split holds" not in caplog.text
    state = load_checkpoint(tmp_path / "model/t/last.pt")["state"]
    assert (state["iteration"], state["seen"]) == (2, 8)


def _voc_like(ids):
    return SimpleNamespace(records=[SimpleNamespace(image_id=i) for i in ids])


def test_data_record_sees_order_names_and_classes():
    base = data_record(_voc_like(["a", "b", "c"]), ("cat", "dog"))
    assert base["images"] == 3 and base["digest"].startswith("sha256:")
    assert data_record(_voc_like(["a", "b", "c"]), ("cat", "dog")) == base
    assert data_record(_voc_like(["b", "a", "c"]), ("cat", "dog")) != base  # reordered
    assert data_record(_voc_like(["a", "b", "d"]), ("cat", "dog")) != base  # renamed
    assert data_record(_voc_like(["a", "b", "c"]), ("dog", "cat")) != base  # classes
    assert data_record(_voc_like(["ab", "c"]), ("cat", "dog"))["digest"] != base["digest"]
    flat = SimpleNamespace(records=SimpleNamespace(image_ids=np.array([1, 2, 3])))
    assert data_record(flat, ("cat",)) == data_record(_voc_like(["1", "2", "3"]), ("cat",))
