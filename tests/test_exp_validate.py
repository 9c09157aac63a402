"""`tokenprune run` / `show`: every argument is checked before the checkpoint loads; one
line, exit 2."""

from __future__ import annotations

import pytest
from PIL import Image

import tokenprune.run
import tokenprune.tiny
from tokenprune.cli import main


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(tokenprune.tiny, "tiny_llava_next", refuse)
    monkeypatch.setattr(tokenprune.run, "load_model", refuse)


def _cases(tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "base5.yaml").write_text("base: 5\n")
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    (tmp_path / "ckpt").mkdir()
    out = ["--out", str(tmp_path / "k.png")]
    return {
        "missing image": (["run", "--image", str(tmp_path / "nope.png"), *out], "--image", "does not exist"),
        "unreadable image": (["show", "--image", str(tmp_path / "garbage.png"), *out], "--image", "cannot be read as an image"),
        "text as image": (["run", "--image", str(tmp_path / "notes.txt"), *out], "--image", "cannot be read as an image"),
        "missing config": (["show", "--config", str(tmp_path / "nope.yaml"), *out], "config", "does not exist"),
        "bad yaml": (["show", "--config", str(tmp_path / "bad.yaml"), *out], "bad.yaml", "not valid YAML"),
        "base 5": (["show", "--config", str(tmp_path / "base5.yaml"), *out], "'base' must be a pipeline mapping", ""),
        "out without extension": (["run", "--out", str(tmp_path / "kept")], "--out", "give a picture file name ending in .png"),
        "out inside a file": (["show", "--out", str(tmp_path / "notes.txt" / "k.png")], "notes.txt is a file, not a folder", ""),
        "out is a folder": (["run", "--out", str(tmp_path)], "is a folder", ""),
        "zero new tokens": (["run", "--max-new-tokens", "0", *out], "--max-new-tokens must be at least 1", ""),
        "zero repeats": (["run", "--repeats", "0", *out], "--repeats must be at least 1", ""),
        "selector typo": (["run", "--selector", "cls_finl", *out], "Did you mean 'cls_final'", ""),
        "budget": (["show", "--budget", "1.5", *out], "float above 1.0", ""),
        "no checkpoint": (["run", "--model", str(tmp_path / "ckpt"), *out], "no config.json there", ""),
        "device": (["run", "--device", "tpu:0", *out], "--device 'tpu:0'", ""),
    }


def test_every_bad_argument_is_one_line_and_exit_2_before_loading(tmp_path, capsys, no_model):
    for name, (argv, first, second) in _cases(tmp_path).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert first in err and second in err and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "k.png").exists()


def test_a_good_image_and_out_pass_the_checks(tmp_path, capsys):
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "green.png")
    code = main(["show", "--image", str(tmp_path / "green.png"), "--out", str(tmp_path / "new" / "k.png"), "--budget", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "new" / "k.png").is_file()
