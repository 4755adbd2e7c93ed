"""The programs' shared runner (hrpo/core/program.py): a bad input or a signal is one line and
an exit code, the process is set up the same way for each, and hrpo.eval, hrpo.inspect and
hrpo.serve use it (their shared flags in one section, a signal while loading a model)."""

import argparse
import os
import signal

import pytest
import torch
import torch.distributed as dist
from transformers.utils import logging as hf_logging

import hrpo.eval
import hrpo.inspect.cli
import hrpo.serve.__main__
from hrpo.core.errors import ConfigError
from hrpo.core.program import add_runtime_arguments, run_program


def tiny_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hrpo.tool")
    add_runtime_arguments(p)
    return p


def test_a_bad_input_is_one_line_and_exit_2(capsys):
    def work(args):
        raise ConfigError("--limit must be an integer >= 1, got 0\n(a second line nobody needs)")

    assert run_program(tiny_parser(), work, []) == 2
    assert capsys.readouterr().err == "error: --limit must be an integer >= 1, got 0\n"

    def full_disk(args):
        raise OSError(28, "No space left on device")

    assert run_program(tiny_parser(), full_disk, []) == 2
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_work_in_one_line_with_128_plus_it(capsys, signum):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN in a background job
    reached = []

    def work(args):
        os.kill(os.getpid(), signum)  # hrpo's handler raises here, in the main thread
        reached.append(True)
        return 0

    code = run_program(tiny_parser(), work, [], stopped="; run it again to continue")
    assert code == 128 + signum and reached == []
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == f"hrpo.tool: stopped by {name}; run it again to continue\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def test_the_work_runs_set_up_and_its_code_is_the_exit_code(monkeypatch):
    seen = {}

    def work(args):
        seen[args.verbose] = (torch.get_num_threads(), hf_logging.is_progress_bar_enabled(), args.device, args.dtype)
        return 7

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word: cpu_threads takes it
    try:
        assert run_program(tiny_parser(), work, []) == 7
        assert run_program(tiny_parser(), work, ["--verbose", "--device", "cpu", "--dtype", "bfloat16"]) == 7
    finally:
        torch.set_num_threads(threads)
    assert seen == {False: (3, False, "auto", "auto"), True: (3, True, "cpu", "bfloat16")}
    assert hf_logging.is_progress_bar_enabled()  # restored


@pytest.mark.parametrize("fails", [False, True])
def test_the_process_group_is_left_after_success_and_failure(fails):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def work(args):
        if fails:
            raise ConfigError("--x is wrong")
        return 0

    try:
        assert run_program(tiny_parser(), work, []) == (2 if fails else 0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("module", [hrpo.eval, hrpo.inspect.cli, hrpo.serve.__main__])
def test_the_programs_share_the_device_and_logging_flags(module, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    section = module.parser().format_help().split("\ndevice and logging:\n")[1].split("\n\n")[0]
    flags = [line.split()[0] for line in section.splitlines() if line.startswith("  --")]
    assert flags == ["--device", "--dtype", "--verbose"]


def test_serve_stopped_while_loading_is_one_line(monkeypatch, capsys):
    def loading(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal stops the load")

    monkeypatch.setattr(hrpo.serve.__main__, "LLM", loading)
    assert hrpo.serve.__main__.main([]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "hrpo.serve: stopped by SIGTERM\n"


def test_eval_stopped_says_a_rerun_continues(monkeypatch, capsys, tmp_path):
    def resolving(args):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(hrpo.eval, "_resolve", resolving)
    assert hrpo.eval.main(["--output-dir", str(tmp_path / "e")]) == 130
    assert capsys.readouterr().err == "hrpo.eval: stopped by SIGINT; run the same command again to continue\n"


def test_inspect_loads_the_model_in_the_dtype_asked_for(monkeypatch, capsys):
    loaded = []
    real = hrpo.inspect.cli.load_policy

    def load_policy(*args):
        hm, tokenizer, meta = real(*args)
        loaded.append(hm.lm_weight.dtype)
        return hm, tokenizer, meta

    monkeypatch.setattr(hrpo.inspect.cli, "load_policy", load_policy)
    argv = ["--prompt", "2 + 3 =", "--max-new-tokens", "2", "--max-rows", "1", "--device", "cpu"]
    assert hrpo.inspect.cli.main([*argv, "--dtype", "bfloat16"]) == 0, capsys.readouterr().err
    assert hrpo.inspect.cli.main(argv) == 0, capsys.readouterr().err
    assert loaded == [torch.bfloat16, torch.float32]
