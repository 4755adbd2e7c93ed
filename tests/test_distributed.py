"""Data-parallel HRPO on torch.distributed (gloo, two CPU processes): each rank rolls out its
share of the global batch and the run equals a single process with the same global batch and
seed, step by step and in the updated weights; a killed distributed run resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hrpo.core.distributed import TIMEOUT_ENV, collective_timeout
from hrpo.core.marker import MarkerMatcher
from hrpo.engine.rollout import SamplingConfig
from hrpo.engine.rollout_engine import EngineOptions, make_engine
from hrpo.model.hybrid import HybridModel

ROOT = Path(__file__).resolve().parents[1]
CLOCKS = ("elapsed_s", "rollout_tokens_per_s", "time_", "mem_")

# One training process (or one rank of several): the embedded task's reward replaced by one
# that varies with the text, so the advantages (and the policy gradient) are not all zero.
# Test hooks, set by environment variables of the launch (none is a production flag):
# PLANS logs each step's micro-batch count and rollout width per rank; NAN_STEP makes every
# loss term of that step non-finite (on rank NAN_RANK only, if set); EOS_RANK ends every
# completion of that rank at its first token (any token counts as EOS there).
RUNNER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, os.environ["TESTS"])
    from conftest import small_config
    import hrpo.train, hrpo.training.setup, hrpo.training.step, hrpo.training.update
    from hrpo.train import train

    out = Path(os.environ["OUT"])
    env = os.environ.get
    rank = env("RANK", "0")
    step = [None]

    def reward(completions, answers):
        hang = env("HANG_AFTER")
        if hang and (out / "checkpoints" / hang).is_dir():
            time.sleep(600)
        return [float(len(c) % 3 == 0) for c in completions]

    def hook(module, name, wrap):
        setattr(module, name, wrap(getattr(module, name)))

    def log_step(real):
        def device_step(self, s):
            step[0] = s
            return real(self, s)
        return device_step

    def log_plan(real):
        def micro_batches(batch, micro_batch_tokens):
            plan = real(batch, micro_batch_tokens)
            with open(f"{out}-plans-{rank}.jsonl", "a") as fh:
                fh.write(json.dumps([step[0], len(plan), batch.completion_ids.shape[1]]) + "\\n")
            return plan
        return micro_batches

    def poison(real):
        def per_token_terms(*args, **kwargs):
            per_token, kl, clip = real(*args, **kwargs)
            if step[0] == int(env("NAN_STEP")) and env("NAN_RANK", rank) == rank:
                per_token = per_token * float("nan")
            return per_token, kl, clip
        return per_token_terms

    def early_eos(real):
        def make_engine(*args, **kwargs):
            engine = real(*args, **kwargs)
            if env("EOS_RANK") == rank:
                engine.eos_ids = list(range(engine.hm.embed.weight.shape[0]))
            return engine
        return make_engine

    hook(hrpo.train.Trainer, "device_step", log_step)
    if env("PLANS"):
        hook(hrpo.training.step, "micro_batches", log_plan)
    if env("NAN_STEP"):
        hook(hrpo.training.update, "per_token_terms", poison)
    if env("EOS_RANK"):
        hook(hrpo.training.setup, "make_engine", early_eos)

    extra = {"fsdp": True} if env("FSDP") == "1" else {}
    for name, kind in (("micro_batch_tokens", int), ("engine", str), ("eval_limit", int), ("eval_batch_size", int)):
        if env(name.upper()):
            extra[name] = kind(env(name.upper()))
    extra.setdefault("eval_limit", 4)
    cfg = small_config(env("MODEL"), out, max_steps=4, save_every=1, keep_checkpoints=4, train_limit=40,
                       batch_size=8, group_size=2, max_completion_length=10, resume=env("RESUME") == "1", **extra)
    train(cfg, reward_fn=reward, progress=False)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, out, procs: int, **env):
    full = {
        **os.environ,
        "TESTS": str(ROOT / "tests"),
        "MODEL": str(model_dir),
        "OUT": str(out),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        TIMEOUT_ENV: "60",  # ranks out of step fail, not hang
        **{k: str(v) for k, v in env.items()},
    }
    cmd = [sys.executable, "-c", RUNNER]
    if procs > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-port",
            str(free_port()),
            "-m",
            "tests_runner",
        ]
        runner = out.parent / "tests_runner.py"
        runner.write_text(RUNNER)
        full["PYTHONPATH"] = f"{ROOT}{os.pathsep}{out.parent}"
    return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers may sit in process groups of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]


def metrics(run: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(CLOCKS)}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoint"
    return {**load_file(str(ckpt / "adapter.safetensors")), **load_file(str(ckpt / "gate.safetensors"))}


def assert_same_training(a: Path, b: Path):
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1, 2, 3]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), (ra["step"], k)
            else:
                assert ra[k] == rb[k], (ra["step"], k)
    assert any(r["reward"] not in (0.0, 1.0) for r in ma)  # mixed rewards: the policy gradient is live
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    finish(launch(model_dir, out, 1))
    return out


def test_rows_of_a_shared_batch_draw_the_whole_batchs_tokens(model_dir):
    """A rank's rows (first, total) sample what those rows sample in the whole batch."""
    from hrpo.model.loading import load_base_model

    model, tok = load_base_model(str(model_dir), torch.device("cpu"), torch.float32)
    hm = HybridModel(model)
    prompts = [tok(f"q{i} ", add_special_tokens=False)["input_ids"] for i in range(4) for _ in range(2)]
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=0)
    for kind in ("fast", "reference"):
        engine = make_engine(
            hm,
            MarkerMatcher(tok, "####", model.config.vocab_size),
            [tok.eos_token_id],
            tok.pad_token_id,
            EngineOptions(),
            kind=kind,
        )
        whole = engine.generate(prompts, cfg, seed=7)
        halves = [engine.generate(prompts[lo : lo + 4], cfg, seed=7, row_span=(lo, 8)) for lo in (0, 4)]
        width = whole.completion_ids.shape[1]
        got = torch.cat(
            [
                torch.nn.functional.pad(
                    h.completion_ids, (0, width - h.completion_ids.shape[1]), value=tok.pad_token_id
                )
                for h in halves
            ]
        )
        assert torch.equal(got, whole.completion_ids), kind
        shifted = engine.generate(prompts[4:], cfg, seed=7)  # the same rows as a batch of their own
        assert not torch.equal(shifted.completion_ids[:, :3], whole.completion_ids[4:, :3]), kind


def test_two_processes_equal_one(model_dir, single, tmp_path):
    out = tmp_path / "two"
    finish(launch(model_dir, out, 2))
    assert_same_training(single, out)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert not any(p.name.startswith("rank") for p in out.iterdir())  # one writer


def test_fsdp_equals_one_process(model_dir, single, tmp_path):
    """--fsdp shards the layers' weights and adapters over the two ranks; the engine gathers
    them for each rollout, the checkpoints hold them whole."""
    out = tmp_path / "fsdp"
    finish(launch(model_dir, out, 2, FSDP=1))
    assert_same_training(single, out)
    assert json.loads((out / "config.json").read_text())["fsdp"] is True


@pytest.mark.parametrize("fsdp", ["0", "1"])
def test_a_killed_distributed_run_resumes(model_dir, single, tmp_path, fsdp):
    out = tmp_path / "killed"
    proc = launch(model_dir, out, 2, HANG_AFTER="step-00000002", FSDP=fsdp)
    end = time.monotonic() + 300
    while not (out / "checkpoints" / "step-00000002").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end
        time.sleep(0.1)
    time.sleep(0.5)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks, no chance to save
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert len(state["rng"]["ranks"]) == 2
    finish(launch(model_dir, out, 2, RESUME=1, FSDP=fsdp))
    assert_same_training(single, out)
    # The RNG states are per rank: one process cannot take over a two-process run.
    proc = launch(model_dir, out, 1, RESUME=1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "this run has 1 (resume with the same number of processes)" in err


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_the_collective_timeout_must_be_seconds(value, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"^{TIMEOUT_ENV} must be a number of seconds > 0, got '{value}'$"):
        collective_timeout()
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert collective_timeout() == timedelta(seconds=2.5)
    monkeypatch.delenv(TIMEOUT_ENV)
    assert collective_timeout() is None  # torch's default


def plans(out: Path) -> dict[int, list[list[int]]]:
    """Each rank's [step, micro-batches, rollout width] per step (the PLANS hook's log)."""
    return {r: [json.loads(line) for line in Path(f"{out}-plans-{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


@pytest.mark.parametrize("fsdp", ["0", "1"])
def test_ranks_with_different_micro_batch_plans_equal_one_process(model_dir, single, tmp_path, fsdp):
    """A budget of 330 tokens packs a rank's two groups into one micro-batch only when its
    prompts are short enough, so at some steps one rank plans one micro-batch and the other
    two (under FSDP each is a collective). Every rank runs as many, and the run equals one
    process (whose whole step is one micro-batch)."""
    out = tmp_path / "plans"
    finish(launch(model_dir, out, 2, FSDP=fsdp, MICRO_BATCH_TOKENS=330, PLANS=1))
    p = plans(out)
    assert [s[0] for s in p[0]] == [s[0] for s in p[1]] == [0, 1, 2, 3]
    assert any(a[1] != b[1] for a, b in zip(p[0], p[1]))
    assert_same_training(single, out)


@pytest.fixture(scope="module")
def single_poisoned(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single-nan"
    finish(launch(model_dir, out, 1, NAN_STEP=2))
    return out


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(model_dir, single_poisoned, tmp_path):
    """Rank 1's loss terms at step 2 are NaN, from the first of its two micro-batches (a budget
    of one token: a group each): under FSDP both ranks still finish that step's collectives,
    agree, and skip the update, as one process whose loss is NaN at step 2."""
    out = tmp_path / "nan"
    finish(launch(model_dir, out, 2, FSDP=1, NAN_STEP=2, NAN_RANK=1, MICRO_BATCH_TOKENS=1))
    assert [r["skipped"] for r in metrics(out)] == [None, None, "non-finite loss", None]
    assert [r["skipped"] for r in metrics(single_poisoned)] == [None, None, "non-finite loss", None]
    assert_same_training(single_poisoned, out)


def test_reference_loop_under_fsdp_decodes_until_every_rank_is_done(model_dir, tmp_path):
    """Under FSDP each step of the reference loop is a collective; rank 1's completions end at
    their first token and rank 0's run on, and the run still finishes."""
    out = tmp_path / "ref"
    finish(launch(model_dir, out, 2, FSDP=1, ENGINE="reference", EOS_RANK=1, PLANS=1))
    p = plans(out)
    assert [s[2] for s in p[1]] == [1, 1, 1, 1] and all(s[2] > 1 for s in p[0])
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]


def test_evaluation_shards_over_ranks_and_merges(single, tmp_path):
    """Two ranks evaluate a share each; rank 0 writes every sample: the same results as one."""
    args = [
        "-m",
        "hrpo.eval",
        "--task",
        "arith",
        "--checkpoint",
        str(single / "checkpoint"),
        "--limit",
        "7",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--max-prompt-length",
        "256",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "60"}
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"eval{procs}"
        launcher = (
            []
            if procs == 1
            else ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        )
        done = subprocess.run(
            [sys.executable, *launcher, *args, "--output-dir", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        runs[procs] = (sorted(samples, key=lambda s: s["index"]), json.loads((out / "results.json").read_text()))
    (one, r1), (two, r2) = runs[1], runs[2]
    assert len(two) == 7 and [s["index"] for s in two] == [s["index"] for s in one]
    assert [s["completion"] for s in two] == [s["completion"] for s in one]
    assert r2["benchmarks"]["arith"]["value"] == r1["benchmarks"]["arith"]["value"]
    assert r2["benchmarks"]["arith"]["n"] == 7


def test_fsdp_evaluation_with_uneven_shares_finishes(model_dir, tmp_path):
    """5 held-out examples over 2 ranks in batches of 2: shares of 3 and 2 would be 2 and 1
    batches; under FSDP the reference loop's every forward is a collective (the engine's
    refresh too, when the weights changed), so the shorter share is filled to the same number
    of examples (and the fill dropped): the run finishes with 5 samples, each once, and the
    same accuracy as one process on the same examples."""
    one, two = tmp_path / "one", tmp_path / "two"
    finish(launch(model_dir, one, 1, EVAL_LIMIT=5, EVAL_BATCH_SIZE=2, ENGINE="reference"))
    finish(launch(model_dir, two, 2, FSDP=1, EVAL_LIMIT=5, EVAL_BATCH_SIZE=2, ENGINE="reference"))
    for when in ("eval_before.json", "eval_after.json"):
        a, b = (json.loads((run / when).read_text()) for run in (one, two))
        assert [s["index"] for s in b["samples"]] == [0, 1, 2, 3, 4]
        assert b["n"] == 5 and b["accuracy"] == a["accuracy"]
