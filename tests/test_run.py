"""The main job, `tokenprune run`, on the built-in tiny model and on a saved local checkpoint."""

from __future__ import annotations

from PIL import Image

from tokenprune.tiny import save_tiny, tiny_llava
from tokenprune.cli import main


def test_default_run_prints_the_table_and_writes_the_picture(tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert main(["run", "--out", str(out), "--repeats", "1", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "built-in tiny LLaVA-NeXT with RANDOM weights" in printed
    assert "thumbnail" in printed and "tile r0c0" in printed
    assert "image tokens to the LLM" in printed and "time to first token" in printed
    assert "generated (3 tokens max, greedy)" in printed
    picture = Image.open(out)
    assert picture.width > 400 and picture.height > 200


def test_run_on_a_local_checkpoint_with_options(tmp_path, capsys):
    model, processor = tiny_llava(seed=3)
    save_tiny(model, processor, tmp_path / "ckpt")
    image = tmp_path / "photo.png"
    Image.new("RGB", (80, 50), (200, 30, 30)).save(image)
    code = main(
        [
            "run",
            "--model", str(tmp_path / "ckpt"),
            "--image", str(image),
            "--selector", "spatial",
            "--allocator", "equal",
            "--budget", "10",
            "--prompt", "Which colour?",
            "--repeats", "1",
            "--max-new-tokens", "2",
            "--out", str(tmp_path / "k.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"checkpoint {tmp_path / 'ckpt'}" in printed and "adapter:   llava(" in printed
    assert "image" in printed and "10" in printed
    assert (tmp_path / "k.png").is_file()


def test_run_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path), "--repeats", "1"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert main(["run", "--budget", "1.5", "--repeats", "1"]) == 2
    assert "float above 1.0" in capsys.readouterr().err
    assert main(["run", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert main(["run", "--selector", "cls_finl", "--repeats", "1"]) == 2
    assert "Did you mean 'cls_final'" in capsys.readouterr().err
