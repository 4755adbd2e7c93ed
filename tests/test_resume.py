"""Checkpoints and exact resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed
reproduces the uninterrupted run, metric for metric and bit for bit."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import small_config
from safetensors.torch import load_file

from hrpo.eval import main as eval_main
from hrpo.train import Trainer
from hrpo.training.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    step_folder,
)
from hrpo.training.reporting import json_safe

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("elapsed_s", "rollout_tokens_per_s", "time_", "mem_")  # what differs between runs: clocks, memory

# A training process: the task's own reward, which stalls (HANG_S seconds per call) once the
# checkpoint named by HANG_AFTER exists, so the parent can kill it at a known place.
RUNNER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, os.environ["TESTS"])
    from conftest import small_config
    from hrpo.tasks.rewards import get_reward_fn
    from hrpo.train import train

    base = get_reward_fn("arith")
    out = Path(os.environ["OUT"])

    def reward(completions, answers):
        hang = os.environ.get("HANG_AFTER")
        if hang and (out / "checkpoints" / hang).is_dir():
            time.sleep(float(os.environ["HANG_S"]))
        return base(completions, answers)

    cfg = small_config(os.environ["MODEL"], out, max_steps=5, save_every=1, keep_checkpoints=2,
                       resume=os.environ.get("RESUME") == "1", train_limit=40)
    train(cfg, reward_fn=reward, progress=False)
""")


def start(model_dir, out, **env):
    full = {
        **os.environ,
        "TESTS": str(ROOT / "tests"),
        "MODEL": str(model_dir),
        "OUT": str(out),
        "PYTHONPATH": str(ROOT),
        **{k: str(v) for k, v in env.items()},
    }
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def wait_for(path: Path, proc, timeout=300):
    end = time.monotonic() + timeout
    while not path.is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def training_metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(run / "checkpoint" / "adapter.safetensors")),
        **load_file(str(run / "checkpoint" / "gate.safetensors")),
    }


def assert_same_run(a: Path, b: Path):
    assert training_metrics(a) == training_metrics(b)
    ta, tb = trained_tensors(a), trained_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    clocks = ("train_seconds", "completions_per_hour", "rollout_tokens_per_s", "update_tokens_per_s")
    assert {k: v for k, v in sa.items() if k not in clocks} == {k: v for k, v in sb.items() if k not in clocks}


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "whole"
    finish(start(model_dir, out))
    assert [r["step"] for r in training_metrics(out)] == [0, 1, 2, 3, 4]
    return out


def test_sigkill_then_resume_reproduces_the_run(model_dir, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = start(model_dir, out, HANG_AFTER="step-00000002", HANG_S=600)
    wait_for(out / "checkpoints" / "step-00000002", proc)
    time.sleep(0.3)  # well inside step 2's stalled reward call
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert not (out / "summary.json").exists()
    finish(start(model_dir, out, RESUME=1))
    assert_same_run(out, uninterrupted)


def test_sigterm_saves_a_checkpoint_and_resume_reproduces_the_run(model_dir, uninterrupted, tmp_path):
    out = tmp_path / "terminated"
    proc = start(model_dir, out, HANG_AFTER="step-00000002", HANG_S=1.0)
    wait_for(out / "checkpoints" / "step-00000002", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGTERM: saving a checkpoint after this step" in err
    assert "stopped by SIGTERM after 3 steps; checkpoint" in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].split("; ")[1].endswith("step-00000003")
    # The step under way finished, was saved, and nothing after it ran.
    assert [r["step"] for r in training_metrics(out)] == [0, 1, 2]
    assert complete_checkpoints(out / "checkpoints")[-1].name == "step-00000003"
    finish(start(model_dir, out, RESUME=1))
    assert_same_run(out, uninterrupted)


def test_checkpoints_keep_the_last_k_and_resume_refuses_a_changed_config(model_dir, uninterrupted, tmp_path, capsys):
    names = [p.name for p in complete_checkpoints(uninterrupted / "checkpoints")]
    assert names == ["step-00000004", "step-00000005"]  # keep_checkpoints=2 of one per step
    state = json.loads((uninterrupted / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 5 and state["trainer"]["opt_step"] == 5
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["lora", "gate", "lambda"]
    from hrpo.train import main as train_main

    assert train_main(["--resume", "--output-dir", str(uninterrupted), "--lr-lora", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --lr-lora 0.1 differs from the run's config (0.0005); a resumed run keeps its config"]


def _trainer(model_dir, out, **kw):
    return Trainer(small_config(model_dir, out, **kw), None, progress=False)


def test_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(model_dir, tmp_path, monkeypatch):
    trainer = _trainer(model_dir, tmp_path / "run")
    trainer.open_run()
    first = trainer.checkpoint()
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    trainer.state.step = 1
    import hrpo.training.runs

    real_write, written = os.write, []

    def filling_write(fd, data):  # the disk fills after 64 KiB of the second checkpoint
        if sum(written) > 64 * 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(hrpo.training.runs.os, "write", filling_write)
    with pytest.raises(CheckpointError) as err:
        trainer.checkpoint()
    monkeypatch.undo()
    assert str(err.value) == f"saving checkpoint {trainer.ckpt_root / 'step-00000001'} failed: No space left on device"
    assert [p.name for p in trainer.ckpt_root.iterdir()] == ["step-00000000"]  # no partial folder left
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


SMALL_FS = "HRPO_TEST_SMALL_FS"  # opt-in: a folder on a small file system that is already mounted


def test_full_small_filesystem(model_dir, tmp_path):
    """The same on a real file system that fills up. Runs only where HRPO_TEST_SMALL_FS names a
    folder on an already-mounted small file system (under 256 MiB free); the test never mounts
    anything. It fills the space beyond 1.5 checkpoints with a file of its own, removed after."""
    where = os.environ.get(SMALL_FS)
    if not where:
        pytest.skip(f"{SMALL_FS} is not set (the patched-write test above covers the logic)")
    if not Path(where).is_dir():
        pytest.fail(f"{SMALL_FS}={where}: no such folder")
    free = shutil.disk_usage(where).free
    if free > 256 * 2**20:
        pytest.fail(f"{SMALL_FS}={where}: {free >> 20} MiB free; name a small file system (under 256 MiB free)")
    trainer = _trainer(model_dir, tmp_path / "probe")
    trainer.open_run()
    size = sum(f.stat().st_size for f in trainer.checkpoint().iterdir())
    work = Path(tempfile.mkdtemp(dir=where, prefix="hrpo-test-"))
    try:
        with open(work / "filler", "wb") as filler:
            while shutil.disk_usage(work).free > size * 1.5:
                filler.write(bytes(min(2**20, int(shutil.disk_usage(work).free - size * 1.5) + 4096)))
                filler.flush()
        trainer = _trainer(model_dir, work / "run")
        trainer.open_run()
        first = trainer.checkpoint()
        trainer.state.step = 1
        with pytest.raises(CheckpointError, match="failed: No space left on device"):
            trainer.checkpoint()
        assert [p.name for p in trainer.ckpt_root.iterdir()] == ["step-00000000"]
        load_checkpoint(_trainer(model_dir, tmp_path / "fresh").hm, first)
    finally:
        shutil.rmtree(work)


def test_pruning_removes_old_steps_and_its_own_leftovers_only(tmp_path):
    """A save killed mid-write (SIGKILL inside write) leaves its temporary folder; the next
    prune removes it and the steps beyond `keep`, and nothing else in checkpoints/."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (step_folder(root, step)).mkdir(parents=True)
    (root / ".mine").mkdir()
    (root / ".mine" / "keep.txt").write_text("not hrpo's")
    (root / ".hrpo-notes").write_text("a file, not a save's folder")
    (root / "step-9-notes").mkdir()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import os
        from pathlib import Path
        from hrpo.training.checkpoint import _atomic_folder
        def write(tmp):
            (tmp / "adapter.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), 9)
        _atomic_folder(Path({str(root)!r}) / "step-00000004", write)
    """),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len([p for p in root.iterdir() if p.name not in {".mine", ".hrpo-notes", "step-9-notes"}]) == 4
    prune_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".hrpo-notes",
        ".mine",
        "step-00000002",
        "step-00000003",
        "step-9-notes",
    ]
    assert (root / ".mine" / "keep.txt").read_text() == "not hrpo's"


def test_corrupt_checkpoint_files_are_one_line_errors(model_dir, tmp_path, capsys):
    trainer = _trainer(model_dir, tmp_path / "run")
    trainer.open_run()
    ckpt = trainer.checkpoint()
    args = [
        "--checkpoint",
        str(ckpt),
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
        "--max-prompt-length",
        "256",
        "--task",
        "arith",
        "--output-dir",
        str(tmp_path / "eval"),
    ]
    adapter = ckpt / "adapter.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[: len(good) // 2])  # truncated
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {adapter}: not a readable safetensors file")
    adapter.write_bytes(good)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    del meta["base_model"]
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    assert eval_main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {ckpt / 'checkpoint.json'}: field 'base_model' missing or of the wrong type"
    )
    meta["base_model"] = str(model_dir)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json: unreadable"):
        _trainer(model_dir, tmp_path / "run", resume=True)


def test_eval_refuses_non_finite_weights(model_dir, tmp_path, capsys):
    trainer = _trainer(model_dir, tmp_path / "run")
    with torch.no_grad():
        trainer.hm.gate.lam[3] = float("nan")
    trainer.open_run()
    ckpt = trainer.checkpoint()
    args = ["--checkpoint", str(ckpt), "--limit", "2", "--task", "arith", "--output-dir", str(tmp_path / "eval")]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: {ckpt / 'gate.safetensors'}: tensor 'lam' holds non-finite values (NaN or inf); "
        "refusing this checkpoint"
    )


def test_checkpoint_round_trips_optimizer_scheduler_rng_and_accumulated_gradients(model_dir, tmp_path):
    a = _trainer(model_dir, tmp_path / "a", grad_accum=2)
    a.open_run()
    a.records = [json_safe(a.device_step(0))]  # half an accumulation: gradients are pending
    pending = {n: p.grad.clone() for n, p in a.hm.named_parameters() if p.grad is not None}
    assert pending
    a.checkpoint()
    b = _trainer(model_dir, tmp_path / "a", grad_accum=2, resume=True)
    assert b.state == a.state and b.records == a.records
    assert torch.equal(b.generator.get_state(), a.generator.get_state())
    for n, p in b.hm.named_parameters():
        if n in pending:
            assert torch.equal(p.grad, pending[n]), n
    assert b.sched.state_dict() == a.sched.state_dict()
    # Both continue identically from here.
    ra, rb = json_safe(a.device_step(1)), json_safe(b.device_step(1))
    assert {k: v for k, v in ra.items() if not k.startswith(TIMING)} == {
        k: v for k, v in rb.items() if not k.startswith(TIMING)
    }
    for (n, pa), (_, pb) in zip(a.hm.named_parameters(), b.hm.named_parameters()):
        assert torch.equal(pa, pb), n
    opt_a, opt_b = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), (i, k)


def test_a_checkpoint_with_the_old_gate_bias_group_is_refused_in_one_line(model_dir, tmp_path):
    """Before the gate's biases joined its group, the optimizer had four (lora, gate holding
    the two weights, gate_bias the two biases without decay, lambda): such a checkpoint is
    refused naming it and what to do, not read with one parameter's moments as another's."""
    out = tmp_path / "run"
    a = _trainer(model_dir, out, save_every=0)
    a.open_run()
    gate, lora = a.hm.gate, [g for g in a.opt.param_groups if g["name"] == "lora"][0]
    a.opt = torch.optim.AdamW(
        [
            {"params": lora["params"], "lr": 1e-3, "name": "lora"},
            {"params": [gate.w_r.weight, gate.w_i.weight], "lr": 1e-3, "name": "gate"},
            {"params": [gate.w_r.bias, gate.w_i.bias], "lr": 1e-3, "name": "gate_bias", "weight_decay": 0.0},
            {"params": [gate.lam], "lr": 1e-3, "name": "lambda"},
        ]
    )
    a.device_step(0)  # the old optimizer steps: it holds moments for every parameter
    saved = a.checkpoint()
    with pytest.raises(CheckpointError) as err:
        _trainer(model_dir, out, save_every=0, resume=True)
    assert str(err.value) == (
        f"{saved}: cannot resume its optimizer: its groups are lora, gate, gate_bias, lambda, this version's "
        f"lora, gate, lambda (gate_bias: saved before the gate's biases joined its group); evaluate its policy "
        f"(python -m hrpo.eval --checkpoint {saved}) or start a new run"
    )
