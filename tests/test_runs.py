"""Nothing lost, nothing wiped: the run folder's manifest, --overwrite, and rollback."""

import json
from pathlib import Path

import pytest
from conftest import small_config

from hrpo.core.errors import ConfigError
from hrpo.train import main as train_main
from hrpo.train import train
from hrpo.training.runs import MANIFEST, RunDir


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes); folders as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def fake_run(folder: Path, extra_user_file=True) -> None:
    """A finished run's folder as hrpo leaves it, plus a file of the user's own."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "adapter.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text('{"task": "arith"}')
    (folder / "metrics.jsonl").write_text('{"step": 0}\n')
    (folder / MANIFEST).write_text(json.dumps({"files": ["config.json", "metrics.jsonl", "checkpoint"]}))
    if extra_user_file:
        (folder / "notes.txt").write_text("mine")


def test_overwrite_moves_only_manifest_files_and_rollback_restores_them(tmp_path):
    run = tmp_path / "run"
    fake_run(run)
    before = snapshot(run)
    rd = RunDir(run, overwrite=True).open()
    rd.path("config.json").write_text("new")
    assert {p.name for p in run.iterdir() if not p.name.startswith(".hrpo-replaced-")} == {
        MANIFEST,
        "notes.txt",
        "config.json",
    }
    rd.rollback()
    assert snapshot(run) == before  # byte for byte, the user's file untouched throughout
    rd = RunDir(run, overwrite=True).open()
    rd.path("config.json").write_text("new")
    rd.started()
    assert {p.name for p in run.iterdir()} == {MANIFEST, "notes.txt", "config.json"}
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / MANIFEST).read_text())["files"] == ["config.json"]


def test_a_new_folder_is_removed_by_rollback(tmp_path):
    rd = RunDir(tmp_path / "a" / "b" / "run").open()
    rd.path("config.json").write_text("x")
    rd.rollback()
    assert list(tmp_path.iterdir()) == []


def test_rollback_keeps_what_others_wrote_beside_the_new_folders(tmp_path):
    """Only folders the run created, and only while empty: a/ held another file before the
    run, b/ gets one while it runs; both stay, with their files, and run/ goes."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "other.txt").write_text("another run's")
    rd = RunDir(tmp_path / "a" / "b" / "c" / "run").open()
    rd.path("config.json").write_text("x")
    (tmp_path / "a" / "b" / "late.txt").write_text("written meanwhile")
    rd.rollback()
    assert snapshot(tmp_path) == {
        "a": None,
        "a/b": None,
        "a/b/late.txt": b"written meanwhile",
        "a/other.txt": b"another run's",
    }


@pytest.mark.parametrize(
    "setup,kwargs,message",
    [
        (
            lambda p: (p.mkdir(), (p / "config.json").write_text("{}")),
            {"overwrite": True},
            "is not empty and holds no hrpo run (no hrpo-run.json)",
        ),
        (lambda p: p.write_text("a file"), {}, "is a file, not a folder"),
        (lambda p: fake_run(p), {}, "holds an hrpo run; pass --resume to continue it or --overwrite to replace it"),
        (lambda p: p.mkdir(), {"resume": True}, "--resume: {p} holds no hrpo run"),
    ],
)
def test_refusals_name_the_folder(tmp_path, setup, kwargs, message):
    path = tmp_path / "out"
    setup(path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        RunDir(path, **kwargs)
    assert message.format(p=path) in str(err.value) and str(path) in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["/proc/hrpo-test/run", "/sys/hrpo-test"])
def test_pseudo_filesystems_are_refused_in_one_line(where):
    with pytest.raises(ConfigError, match=rf"^--output-dir {where}: cannot create files in /(proc|sys) \("):
        RunDir(where)


def test_manifest_cannot_point_outside_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MANIFEST).write_text(json.dumps({"files": ["../victim"]}))
    with pytest.raises(ConfigError, match="a listed path leaves the run folder"):
        RunDir(run, overwrite=True)


def test_hugging_face_model_folder_is_never_wiped(model_dir, tmp_path, capsys):
    before = snapshot(model_dir)
    assert train_main(["--model", str(model_dir), "--output-dir", str(model_dir), "--overwrite"]) == 2
    assert "holds no hrpo run" in capsys.readouterr().err.strip().splitlines()[-1]
    assert snapshot(model_dir) == before


def test_mistyped_data_with_overwrite_leaves_a_finished_run_untouched(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    fake_run(run)
    before = snapshot(run)
    argv = [
        "--task",
        "gsm8k",
        "--model",
        str(model_dir),
        "--data",
        str(tmp_path / "typo.jsonl"),
        "--eval-data",
        str(tmp_path / "typo.jsonl"),
        "--output-dir",
        str(run),
        "--overwrite",
    ]
    assert train_main(argv) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"error: --data {tmp_path / 'typo.jsonl'}: no such file or folder"
    )
    assert snapshot(run) == before


def test_a_run_failing_at_its_first_step_puts_the_folder_back(model_dir, tmp_path):
    def wrong_count(completions, answers):
        return [0.0] * (len(completions) - 1)

    # New folders disappear again; the folder above them, which holds another file, stays.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "other.txt").write_text("mine")
    out = tmp_path / "a" / "b" / "c"
    with pytest.raises(ValueError, match=r"^reward function wrong_count returned 7 values for 8 completions$"):
        train(small_config(model_dir, out), reward_fn=wrong_count, progress=False)
    assert snapshot(tmp_path / "a") == {"other.txt": b"mine"}
    # An existing run replaced with --overwrite comes back byte for byte.
    out = tmp_path / "old"
    train(small_config(model_dir, out, max_steps=1), progress=False)
    before = snapshot(out)
    with pytest.raises(ValueError, match="returned 7 values"):
        train(small_config(model_dir, out, overwrite=True), reward_fn=wrong_count, progress=False)
    assert snapshot(out) == before
    # ... and the corrected rerun is not refused.
    train(small_config(model_dir, out, overwrite=True, max_steps=1), progress=False)
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
