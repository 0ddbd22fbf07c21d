import numpy as np
import pytest
import torch

from dualnet import ARCHS, build_model, load_model, register, save_model
from dualnet.models import DualNet, LateFusion


def _batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("arch", ["late", "pixel"])
def test_output_shapes(arch):
    model = build_model(arch, width=4, hidden=16)
    images, numbers = _batch()
    class_logits, sum_logits = model(images, numbers)
    assert class_logits.shape == (6, 10) and sum_logits.shape == (6, 19)
    class_pred, sum_pred = model.predict(images, numbers)
    assert class_pred.shape == (6,) and sum_pred.shape == (6,) and sum_pred.max() <= 18


def test_pixel_writes_exactly_the_last_ten_pixels():
    model = build_model("pixel", width=4, hidden=16)
    images, numbers = _batch(8)
    plain = DualNet.normalize(images)
    written = model.prepare(images, numbers)
    changed = (written != plain)[:, 0]
    outside = changed.clone()
    outside[:, 27, 18:] = False
    assert not outside.any(), "pixel design touched pixels outside row 27, columns 18-27"
    expected = torch.nn.functional.one_hot(numbers, 10).float()
    assert torch.equal(written[:, 0, 27, 18:], expected)


def test_late_keeps_the_image_untouched_and_appends_the_one_hot():
    model = build_model("late", width=4, hidden=16)
    images, numbers = _batch(3)
    assert torch.equal(model.prepare(images, numbers), DualNet.normalize(images))
    features = model.features(images, numbers)
    assert torch.equal(features[:, -10:], torch.nn.functional.one_hot(numbers, 10).float())


def test_no_global_pooling_in_trunk():
    model = build_model("pixel", width=4, hidden=16)
    assert not any(isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)) for m in model.modules())
    # Moving the one-hot (a different number) must change the trunk's features.
    images, _ = _batch(1)
    a = model.features(images, torch.tensor([0]))
    b = model.features(images, torch.tensor([9]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("arch", ["late", "pixel"])
def test_load_model_round_trips(tmp_path, arch):
    model = build_model(arch, width=4, hidden=16, dropout=0.3, depth=1).eval()
    images, numbers = _batch(20)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.arch == arch and loaded.hparams == model.hparams and not loaded.training
    for got, want in zip(loaded.predict(images, numbers), model.predict(images, numbers)):
        assert torch.equal(got, want)
    # Numpy input and a single image work too.
    c, s = loaded.predict(images[0].numpy(), int(numbers[0]))
    assert c.shape == (1,) and s.shape == (1,)


def test_predict_rejects_bad_input():
    model = build_model("late", width=4, hidden=16)
    images, numbers = _batch(3)
    with pytest.raises(ValueError, match="uint8"):
        model.predict(images.float(), numbers)
    with pytest.raises(ValueError, match="0..9"):
        model.predict(images, numbers + 10)
    with pytest.raises(ValueError, match="shape"):
        model.predict(images, numbers[:2])
    with pytest.raises(ValueError, match="integers"):
        model.predict(images, numbers.float() + 0.5)
    with pytest.raises(ValueError, match="one number"):
        model.predict(images[0], numbers[:2])
    for batch_size in (0, -1):  # -1 returned nothing at all
        with pytest.raises(ValueError, match=f"batch_size={batch_size} must be an integer >= 1"):
            model.predict(images, numbers, batch_size=batch_size)


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        save_model(build_model("late", width=4, hidden=16), tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_load_model_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dualnet model"):
        load_model(tmp_path / "other.pt")


def test_registry_builds_by_name_and_takes_a_new_design():
    assert set(ARCHS) >= {"late", "pixel"}
    model = build_model("late", width=32, hidden=128, dropout=0.2)
    assert isinstance(model, LateFusion) and model.hparams["width"] == 32
    with pytest.raises(ValueError, match="unknown arch 'nope'"):
        build_model("nope")

    @register("inverted")
    class Inverted(LateFusion):
        def prepare(self, images, numbers):
            return -DualNet.normalize(images)

    try:
        class_logits, _ = build_model("inverted", width=4, hidden=8)(*_batch(2))
        assert class_logits.shape == (2, 10)
    finally:
        del ARCHS["inverted"]


@pytest.mark.parametrize("bad", [{"width": 0}, {"hidden": 2.5}, {"dropout": 1.0}])
def test_bad_sizes_name_the_setting(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_model("late", **bad)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran during load",))


def test_load_model_never_unpickles_code(tmp_path, capsys):
    torch.save({"format": 1, "arch": "late", "payload": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable dualnet model"):
        load_model(tmp_path / "evil.pt")
    assert "code ran during load" not in capsys.readouterr().out


def test_save_model_refuses_extra_data_that_load_model_could_not_read(tmp_path):
    model = build_model("late", width=4, hidden=16)
    for extra, where in (({"history": [{"acc": np.float64(0.5)}]}, r"extra\['history'\]\[0\]\['acc'\] is a float64"),
                         ({"weights": np.zeros(3)}, r"extra\['weights'\] is a ndarray")):
        with pytest.raises(ValueError, match=where):
            save_model(model, tmp_path / "m.pt", extra=extra)
        assert not list(tmp_path.iterdir())
    save_model(model, tmp_path / "m.pt", extra={"history": [{"acc": 0.5, "note": None}], "seeds": (0, 1)})
    assert load_model(tmp_path / "m.pt").hparams == model.hparams


def test_load_model_calls_a_damaged_file_damaged(tmp_path):
    model = build_model("late", width=4, hidden=16)
    save_model(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    for damage in ({"hparams": None}, {"state_dict": {}}, {"hparams": {**payload["hparams"], "width": 8}}):
        torch.save({**payload, **damage}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="is a damaged dualnet model file"):
            load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("bad", [{"width": True}, {"width": float("inf")}, {"depth": float("nan")},
                                 {"dropout": "0.1"}])
def test_sizes_of_the_wrong_type_name_the_setting(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_model("late", **bad)
