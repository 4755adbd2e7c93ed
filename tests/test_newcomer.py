"""A newcomer's first commands, typed as the README has them: each mistake gets one line,
evaluation follows the checkpoint it is given, and nothing third-party talks over hrpo."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import small_config

import hrpo.train
import hrpo.training.setup
from hrpo.core.program import cpu_threads, quiet_libraries
from hrpo.eval import main as eval_main
from hrpo.eval import parser as eval_parser
from hrpo.inspect.cli import main as inspect_main
from hrpo.inspect.cli import parser as inspect_parser
from hrpo.model.loading import build_policy, load_base_model
from hrpo.train import main as train_main
from hrpo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """A finished run trained with hybrid off and the marker '##': settings an evaluation
    must take from the checkpoint, since they differ from hrpo.eval's own defaults."""
    out = tmp_path_factory.mktemp("newcomer") / "run"
    train(small_config(model_dir, out, max_steps=1, hybrid=False, marker="##", eval_limit=2), progress=False)
    return out


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_eval_of_a_run_folder_follows_its_checkpoint(run, model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--checkpoint", str(run), "--limit", "2", "--max-new-tokens", "4", "--output-dir", str(out), "--quiet"]
    assert eval_main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        f"evaluating checkpoint {run / 'checkpoint'} (task arith, base model {model_dir.resolve()}, "
        "hybrid off, system prompt off, marker '##')"
    )
    row = json.loads((out / "results.json").read_text())["benchmarks"]["arith"]
    assert row["decoding"]["hybrid"] is False and row["checkpoint"] == str(run / "checkpoint")
    # What the user types wins over the record.
    assert eval_main(args[:-3] + ["--output-dir", str(tmp_path / "e2"), "--hybrid", "--system-prompt"]) == 0
    assert "hybrid on (hrpo), system prompt on, marker '##')" in capsys.readouterr().out.splitlines()[0]


def test_an_unfinished_run_names_the_checkpoint_to_pick(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run / "checkpoints", unfinished / "checkpoints")
    latest = sorted((unfinished / "checkpoints").glob("step-*"))[-1]
    assert eval_main(["--checkpoint", str(unfinished), "--output-dir", str(tmp_path / "e")]) == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: --checkpoint {unfinished} is an unfinished run; pick one "
        f"of its checkpoints, the latest: --checkpoint {latest}"
    )
    assert not (tmp_path / "e").exists()


def test_inspect_of_a_run_folder_follows_its_checkpoint(run, model_dir, capsys):
    assert (
        inspect_main(["--checkpoint", str(run), "--prompt", "2 + 3 =", "--max-new-tokens", "3", "--max-rows", "1"]) == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == (
        f"inspecting checkpoint {run / 'checkpoint'} (task arith, base model {model_dir.resolve()}, hybrid off, "
        "system prompt off, marker '##')"
    )


def test_eval_command_is_quiet_and_says_what_it_evaluates(run, tmp_path):
    """As typed in a shell: no FutureWarning from transformers, no loading bar, one line
    naming the checkpoint, then the table."""
    cmd = [
        sys.executable,
        "-m",
        "hrpo.eval",
        "--checkpoint",
        str(run),
        "--limit",
        "1",
        "--max-new-tokens",
        "2",
        "--output-dir",
        str(tmp_path / "e"),
        "--quiet",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"evaluating checkpoint {run / 'checkpoint'} (task arith,")


def test_loading_is_quiet_unless_verbose(model_dir, capfd):
    """peft reads transformers' deprecated is_gradient_checkpointing when it attaches LoRA,
    and transformers draws a bar while it loads weights: both are gone, unless verbose."""
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with quiet_libraries(verbose):
                model, _ = load_base_model(str(model_dir), "cpu", None)
                build_policy(model, small_config(model_dir, "unused", lora_rank=2, lora_alpha=4))
        future = [
            w for w in seen if issubclass(w.category, FutureWarning) and "is_gradient_checkpointing" in str(w.message)
        ]
        assert bool(future) is verbose
        assert ("Loading weights" in capfd.readouterr().err) is verbose


def test_train_refuses_data_the_task_does_not_read(tmp_path, capsys, model_dir):
    out = tmp_path / "r"
    assert train_main(["--data", "/no/such/file.jsonl", "--output-dir", str(out)]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: --data /no/such/file.jsonl: the arith task generates its "
        "examples and reads no data; drop --data or choose another --task"
    )
    assert (
        train_main(
            [
                "--task",
                "gsm8k",
                "--model",
                str(model_dir),
                "--eval-data",
                str(tmp_path / "typo.jsonl"),
                "--data",
                "openai/gsm8k:main",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )
    assert last_line(capsys.readouterr().err) == f"error: --eval-data {tmp_path / 'typo.jsonl'}: no such file or folder"
    assert train_main(["--task", "gsm8k", "--output-dir", str(out)]) == 2
    assert last_line(capsys.readouterr().err) == (
        "error: --task gsm8k needs --model (a hub name, a folder, a .gguf, or smollm2-135m)"
    )
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "inspect"])
def test_a_folder_that_is_no_model_is_one_line(tmp_path, capsys, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--model", str(empty), "--output-dir", str(tmp_path / "o")]
    code = {
        "train": lambda: train_main(argv),
        "eval": lambda: eval_main(argv + ["--task", "arith"]),
        "inspect": lambda: inspect_main(["--model", str(empty), "--prompt", "hi"]),
    }[command]()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == f"error: model folder {empty} holds no config.json and no .gguf file\n"


@pytest.mark.parametrize("signum, where", [(signal.SIGINT, "heldout_both"), (signal.SIGTERM, "load_base_model")])
def test_a_signal_before_the_first_step_is_one_line(model_dir, tmp_path, capsys, monkeypatch, signum, where):
    """Ctrl-C during the evaluation before training, SIGTERM while the model loads: one line,
    exit 128 + signal, the folder rolled back, and --resume says there is nothing to resume."""
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    real = getattr(hrpo.training.setup, where) if where == "load_base_model" else hrpo.train.Trainer.heldout_both

    def interrupted(*a, **kw):
        os.kill(os.getpid(), signum)  # the handler hrpo installed runs here, in the main thread
        return real(*a, **kw)

    if where == "load_base_model":
        monkeypatch.setattr(hrpo.training.setup, where, interrupted)
    else:
        monkeypatch.setattr(hrpo.train.Trainer, where, interrupted)
    out = tmp_path / "r"
    argv = [
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--group-size",
        "4",
        "--max-completion-length",
        "4",
        "--eval-limit",
        "2",
        "--lora-rank",
        "2",
        "--max-prompt-length",
        "256",
        "--train-limit",
        "8",
    ]
    assert train_main(argv) == 128 + signum
    name = signal.Signals(signum).name
    err = capsys.readouterr().err
    assert err == f"hrpo: stopped by {name} before the first step; nothing to resume\n"
    assert not out.exists()
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    assert train_main(["--resume", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"error: nothing to resume in {out}\n"


def test_ctrl_c_in_training_names_the_steps_done_and_their_checkpoint(model_dir, tmp_path, capsys, monkeypatch):
    real = hrpo.train.Trainer.device_step

    def step_then_ctrl_c(self, s):
        record = real(self, s)
        os.kill(os.getpid(), signal.SIGINT)  # during the step: it finishes, is saved, and the run stops
        return record

    monkeypatch.setattr(hrpo.train.Trainer, "device_step", step_then_ctrl_c)
    out = tmp_path / "r"
    argv = [
        "--model",
        str(model_dir),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--group-size",
        "4",
        "--max-completion-length",
        "4",
        "--eval-limit",
        "2",
        "--lora-rank",
        "2",
        "--max-prompt-length",
        "256",
        "--train-limit",
        "24",
    ]
    assert train_main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    # on a line of its own, not glued to the progress bar's
    assert (
        "hrpo: SIGINT: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, without "
        "saving)" in err
    )
    assert err[-1] == (
        f"hrpo: stopped by SIGINT after 1 step; checkpoint {out / 'checkpoints' / 'step-00000001'}; "
        "continue with --resume"
    )
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]


def test_resume_of_a_finished_run_does_nothing(run, capsys):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert train_main(["--resume", "--output-dir", str(run)]) == 0
    steps = json.loads((run / "summary.json").read_text())["device_steps"]
    assert steps == 1 and capsys.readouterr().out == f"hrpo: {run} finished at step 1; nothing to do\n"
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert train_main(["--resume", "--output-dir", str(run), "--seed", "7"]) == 2  # a changed flag is still refused
    assert (
        capsys.readouterr().err == "error: --seed 7 differs from the run's config (0); a resumed run keeps its config\n"
    )


def test_thread_count_follows_the_environment():
    assert cpu_threads({}, 16, busy=0.0) == 16
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, 16, busy=0.0) == 3
    assert cpu_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}, 16, busy=0.0) == 3  # the user's word wins
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, 2, busy=5.0) == 3  # even on a busy machine
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 16, busy=0.0) == 4
    assert cpu_threads({"LOCAL_WORLD_SIZE": "3"}, 16, busy=0.0) == 5  # 16 // 3
    assert cpu_threads({"LOCAL_WORLD_SIZE": "8"}, 2, busy=0.0) == 1  # more processes than cores: at least one
    assert cpu_threads({"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "2"}, 6, busy=0.0) == 3
    # Busy cores are left to their work: 2 cores with a load of 2.5 -> 1 thread; 16 with 10.4
    # busy -> 6 free, 3 each for 2 processes; a machine loaded past its cores still gets 1.
    assert cpu_threads({}, 2, busy=2.5) == 1
    assert cpu_threads({}, 2, busy=0.4) == 2
    assert cpu_threads({}, 16, busy=10.4) == 6
    assert cpu_threads({"LOCAL_WORLD_SIZE": "2"}, 16, busy=10.4) == 3
    assert cpu_threads({}, 4, busy=9.0) == 1


@pytest.mark.parametrize("make", [eval_parser, inspect_parser])
def test_every_flag_has_help_with_its_default(make):
    p = make()
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in flags), [a.dest for a in flags if not a.help]
    text = " ".join(p.format_help().split())
    for a in flags:
        assert f"(default: {a.default})" in text, a.dest
    assert text.count("(default: ") == len(flags)
