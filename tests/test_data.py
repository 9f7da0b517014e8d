import torch

from flatllm_export import data


def test_shakespeare_splits_are_disjoint_whole_plays():
    train, val, test = (set(data.shakespeare_split(s)) for s in data.SPLITS)
    assert test == set(data.SHAKESPEARE_TEST) and val == set(data.SHAKESPEARE_VALIDATION)
    assert not (train & test) and not (train & val) and len(train) >= 30


def test_markup_is_stripped():
    text = data.shakespeare_text("test")
    assert "**" not in text and "\n#" not in text and not text.startswith("#")
    assert "HAMLET" in text and "To be, or not to be" in text


def test_text_is_deterministic():
    assert data.shakespeare_text("validation") == data.shakespeare_text("validation")


def test_calibration_windows_are_seeded():
    tokens = torch.arange(10_000)
    a = data.calibration_windows(tokens, 8, 64, seed=0)
    b = data.calibration_windows(tokens, 8, 64, seed=0)
    c = data.calibration_windows(tokens, 8, 64, seed=1)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows


def test_evaluation_windows_are_non_overlapping():
    w = data.evaluation_windows(torch.arange(1000), 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), torch.arange(896))


def test_local_file_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert data.load_text(str(tmp_path / "*.txt"), "train") == "alpha\n\nbeta"
