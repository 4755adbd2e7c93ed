"""python -m hrpo.serve in a subprocess on a free port of 127.0.0.1, driven by the official
openai client (and httpx where the client hides the HTTP): the endpoints, streaming, the
extension fields, auth, bad input, cancellation, a full queue, SIGTERM, and outputs equal to
the engine's for each request alone and to hrpo.eval's."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai client is built on
import openai
import pytest
import torch

from hrpo.engine.rollout import SamplingConfig
from hrpo.eval import main as eval_main
from hrpo.model.loading import build_policy, load_base_model
from hrpo.serve import LLM
from hrpo.serve.__main__ import loopback
from hrpo.serve.__main__ import main as serve_main
from hrpo.serve.llm import latent_flags
from hrpo.training.checkpoint import save_checkpoint
from hrpo.training.config import config_for
from hrpo_kernels.latent_input import MODES, LatentParams

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, key: str | None = KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("HRPO_API_KEY", None)
        if key:
            env["HRPO_API_KEY"] = key  # the environment variable's way in
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hrpo.serve", "--port", str(self.port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("server did not come up in 120 s")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers=self.headers, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def idle(self) -> dict[str, float]:
        """The metrics once the batch has emptied (a cancelled row leaves at the next step)."""
        for _ in range(50):
            m = self.metrics()
            if m["hrpo_running_rows"] == 0 and m["hrpo_waiting_requests"] == 0:
                return m
            time.sleep(0.1)
        raise AssertionError(f"the batch never emptied: {m}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An HRPO checkpoint of the embedded model: adapters and a gate away from their initial
    values (a ~ 0.73, so thinking inputs visibly blend the latent)."""
    torch.manual_seed(0)  # peft's LoRA A init
    model, _ = load_base_model(None, torch.device("cpu"), torch.float32)
    hm = build_policy(model, config_for("arith", lora_rank=4, lora_alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hm.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        hm.gate.lam.uniform_(2.0, 3.0, generator=g)
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(hm, path, base_model=None)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = Server("--checkpoint", str(checkpoint), "--max-batch", "32", "--max-model-len", "320")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same checkpoint in this process (the engine alone, the tokenizer's prompts)."""
    return LLM(str(checkpoint), max_model_len=320)


def chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=str_model(client), messages=[{"role": "user", "content": content}], **kw
    )


def str_model(client) -> str:
    return client.models.list().data[0].id


def alone_text(
    local: LLM, content: str, max_tokens: int, hybrid: bool = True, latent: LatentParams = LatentParams()
) -> str:
    """The engine's greedy completion of this chat prompt generated by itself."""
    prompt = local.chat_prompt([{"role": "user", "content": content}])
    cfg = SamplingConfig(max_tokens, 0.5, 50, greedy=True, hybrid=hybrid, latent=latent)
    out = local.scheduler.engine.generate([prompt], cfg)
    return local.decode(out.completion_ids[0][out.completion_mask[0]].tolist())


def test_openai_client_chat_completions_stream_n_stop_seed_logprobs(server, local):
    client = server.client()
    model = str_model(client)
    assert model == "ckpt"  # the checkpoint folder's name, not its path
    # chat: greedy by default, the engine's text, usage and the hybrid extension per choice
    r = chat(client, "What is 2 + 3?", max_tokens=20)
    text = r.choices[0].message.content
    assert text == alone_text(local, "What is 2 + 3?", 20)
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(local.chat_prompt([{"role": "user", "content": "What is 2 + 3?"}]))
    ext = r.choices[0].model_extra["hrpo"]
    assert ext["thinking_tokens"] > 0 and 0.0 < ext["gate_mean"] < 1.0
    # plain tokens on request: no thinking blended, the plain engine's text
    plain = chat(client, "What is 2 + 3?", max_tokens=20, extra_body={"hybrid": False})
    assert plain.choices[0].model_extra["hrpo"] == {"thinking_tokens": 0, "gate_mean": None, "latent_mode": None}
    assert plain.choices[0].message.content == alone_text(local, "What is 2 + 3?", 20, hybrid=False)
    # another latent mode on request: Soft Thinking's mixture at temperature 0.2, no gate. This
    # model's greedy text is the same in every mode; the log-probs show which inputs it was fed.
    body = {"latent_mode": "soft", "latent_options": {"temperature": 0.2}}
    soft = chat(client, "What is 2 + 3?", max_tokens=20, logprobs=True, extra_body=body)
    ext = soft.choices[0].model_extra["hrpo"]
    assert ext["latent_mode"] == "soft" and ext["thinking_tokens"] > 0 and ext["gate_mean"] is None
    latent = LatentParams("soft", temperature=0.2)
    assert soft.choices[0].message.content == alone_text(local, "What is 2 + 3?", 20, latent=latent)
    prompt = local.chat_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    engine_lp = local.scheduler.engine.generate(
        [prompt], SamplingConfig(20, 0.5, 50, greedy=True, latent=latent)
    ).logprobs[0]
    hrpo_lp = chat(client, "What is 2 + 3?", max_tokens=20, logprobs=True).choices[0].logprobs.content
    got = [t.logprob for t in soft.choices[0].logprobs.content]
    assert got == pytest.approx(engine_lp.tolist(), abs=1e-4)
    assert max(abs(a - b.logprob) for a, b in zip(got, hrpo_lp)) > 1e-3  # hrpo's gate fed other inputs
    # streaming: the chunks reassemble to the non-streamed text, [DONE] ends it
    chunks = list(chat(client, "What is 2 + 3?", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # completions, n > 1 sampled with a seed: reproducible, and the choices differ
    a = client.completions.create(model=model, prompt="Once upon", max_tokens=12, n=3, temperature=2.0, seed=11)
    b = client.completions.create(model=model, prompt="Once upon", max_tokens=12, n=3, temperature=2.0, seed=11)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    out = local.scheduler.engine.generate(
        [local.text_prompt("Once upon")] * 3, SamplingConfig(12, 2.0, 50, greedy=False), seed=11
    )
    assert [c.text for c in a.choices] == [
        local.decode(ids[m].tolist()) for ids, m in zip(out.completion_ids, out.completion_mask)
    ]
    assert a.usage.completion_tokens == int(out.completion_mask.sum())
    # top_p: the engine's seeded nucleus sampling, and a narrow nucleus changes the text
    nuc = client.completions.create(
        model=model, prompt="Once upon", max_tokens=12, n=3, temperature=2.0, top_p=0.3, seed=11
    )
    out = local.scheduler.engine.generate(
        [local.text_prompt("Once upon")] * 3, SamplingConfig(12, 2.0, 50, 0.3, greedy=False), seed=11
    )
    assert [c.text for c in nuc.choices] == [
        local.decode(ids[m].tolist()) for ids, m in zip(out.completion_ids, out.completion_mask)
    ]
    assert [c.text for c in nuc.choices] != [c.text for c in a.choices]
    # stop strings: the text ends before the first stop, finish_reason stop
    full = client.completions.create(model=model, prompt="Once upon", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=model, prompt="Once upon", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=model, prompt="Once upon", max_tokens=30, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    # logprobs: one per token, the top alternatives sorted, the chosen token's the best under greedy
    lp = chat(client, "Hi", max_tokens=5, logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert len(lp) == 5
    for item in lp:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        assert abs(item.logprob - tops[0]) < 1e-3 and item.token == item.top_logprobs[0].token
    m = server.metrics()
    assert m['hrpo_requests_total{outcome="ok"}'] >= 9 and m["hrpo_generation_tokens_total"] > 100
    assert m["hrpo_time_to_first_token_seconds_count"] >= 9 and m["hrpo_batch_slots"] == 32


def test_api_key_on_every_endpoint_but_health(server):
    for key in (None, "wrong", KEY + "x"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/metrics"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("GET", "/nowhere"),
        ]:
            r = httpx.request(method, server.url + path, headers=headers, content=b"{}", timeout=10)
            assert r.status_code == 401, (key, path)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.client().models.list().data


BAD = [
    (b'{"messages": [', 400, None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 33}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 10**6}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": "all"}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "latent_mode": "dream"}, 400, "latent_mode"),
    ({"messages": [{"role": "user", "content": "hi"}], "latent_mode": "soft", "hybrid": False}, 400, "latent_mode"),
    ({"messages": [{"role": "user", "content": "hi"}], "latent_options": {"noise_std": -1}}, 400, "latent_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "latent_options": {"sigma": 1}}, 400, "latent_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "latent_options": [0.1]}, 400, "latent_options"),
    ([1, 2], 400, None),
]


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, checkpoint):
    for body, status, param in BAD:
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"], body
        assert "Traceback" not in r.text and str(ROOT) not in r.text and str(checkpoint.parent) not in r.text
    r = server.post("/v1/completions", {"prompt": "x " * 400})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = server.post("/v1/completions", b"{" + b" " * (1 << 20) + b"}")
    assert r.status_code == 413
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    server.idle()


def test_32_concurrent_clients_at_random_moments_equal_the_engine_alone(server, local):
    rng = random.Random(3)
    words = ["apples", "seven", "plus", "what", "is", "two", "Tom", "has", "buys", "more", "minus", "three"]
    asks = [
        (
            " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))),
            rng.randint(4, 40),
            rng.random() < 0.7,
            rng.choice(MODES),
        )
        for _ in range(32)
    ]
    delays = [rng.uniform(0, 1.5) for _ in asks]
    got: dict[int, str] = {}
    client = server.client()

    def ask(i: int) -> None:
        time.sleep(delays[i])
        content, max_tokens, hybrid, mode = asks[i]
        body = {"hybrid": hybrid, **({"latent_mode": mode} if hybrid else {})}
        got[i] = chat(client, content, max_tokens=max_tokens, temperature=0, extra_body=body).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 32
    for i, (content, max_tokens, hybrid, mode) in enumerate(asks):
        want = alone_text(local, content, max_tokens, hybrid, LatentParams(mode))
        assert got[i] == want, f"client {i} differs from the engine alone"
    m = server.idle()
    assert m['hrpo_requests_total{outcome="failed"}'] == 0


def test_checkpoint_served_gives_the_text_of_hrpo_eval(server, checkpoint, tmp_path):
    records = [
        {"question": "Tom has 3 apples and buys 4 more. How many does he have?", "answer": "... #### 7"},
        {"question": "What is 12 minus 5?", "answer": "#### 7"},
    ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "eval"
    assert (
        eval_main(
            [
                "--task",
                "gsm8k",
                "--checkpoint",
                str(checkpoint),
                "--data",
                str(data),
                "--max-new-tokens",
                "24",
                "--output-dir",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    client = server.client()
    for s in samples:
        r = chat(client, s["prompt"], max_tokens=24)
        assert r.choices[0].message.content == s["completion"]
        assert r.usage.completion_tokens == s["completion_tokens"]
        assert r.choices[0].model_extra["hrpo"]["gate_mean"] == pytest.approx(s["gate_mean"], rel=1e-5)


def test_a_long_greedy_request_is_the_same_whoever_joins_the_batch(local):
    """300 greedy hybrid tokens, alone and with another request joining after 0 (prefilled in
    the same step: a longer chat prompt, or another prompt of the same length), 1, 10 or 100
    steps (so decoding at 2 rows for a while): the same tokens. Tiny differences in a row's
    numbers grow over a long greedy run: a GEMM whose per-row bits depend on the batch size
    (MKL's sgemm takes another path for one row), or a prompt padded to a longer one's width
    in a shared prefill, broke this at the 200th-250th token."""
    sched = local.scheduler
    prompt = local.text_prompt("Once upon a time")
    chat = local.chat_prompt([{"role": "user", "content": "What is 2 + 3?"}])
    same_length = local.text_prompt("Once upon a tide")
    assert len(same_length) == len(prompt) < len(chat) and same_length != prompt

    def run(join_at: int | None, other: list[int]) -> list[int]:
        good = sched.submit(local.request(prompt, max_tokens=300, ignore_eos=True))
        steps = 0
        while not good.done.is_set():
            if steps == join_at:
                sched.submit(local.request(other, max_tokens=20))
            sched.step()
            steps += 1
        while sched.busy():
            sched.step()
        return good.choices[0].tokens

    alone = run(None, chat)
    prefills = sched.stats["prefills"]
    assert run(0, same_length) == alone and run(0, chat) == alone
    assert sched.stats["prefills"] == prefills + 2  # each pair joined in one step
    for join_at in (1, 10, 100):
        assert run(join_at, chat) == alone, join_at


def test_a_request_whose_latent_overflows_gets_a_500_while_a_concurrent_one_completes(server):
    """soft-noise with sigma 1e39, a finite JSON number past float32's range: its noise, so its
    thinking input, is infinite and the model's state NaN, so that request alone fails with a
    500 (OpenAI's error shape, no trace or path) while a stream decoding beside it completes."""
    before = server.metrics()
    good = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
    bad = {
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "max_tokens": 20,
        "temperature": 1.0,  # soft-noise draws its noise when sampling (greedy adds none)
        "seed": 1,
        "latent_mode": "soft-noise",
        "latent_options": {"noise_std": 1e39},
    }
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**good, "stream": True}, headers=server.headers, timeout=60
    ) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: {")  # the good request decodes
        failed = server.post("/v1/chat/completions", bad)
        assert server.metrics()["hrpo_running_rows"] == 1  # the good one still runs after the failure
        events = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
    assert failed.status_code == 500, failed.text
    assert failed.json() == {
        "error": {
            "message": "the model produced non-finite logits",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert streamed == server.post("/v1/completions", good).json()["choices"][0]["text"]  # as when alone
    m = server.idle()
    assert m['hrpo_requests_total{outcome="failed"}'] == before['hrpo_requests_total{outcome="failed"}'] + 1
    finite = server.post("/v1/chat/completions", {**bad, "latent_options": {"noise_std": 0.5}})
    assert finite.status_code == 200  # the same request at an ordinary sigma is served


def test_a_soft_tokens_checkpoint_is_served_in_its_mode(tmp_path):
    """A checkpoint trained with --method soft-tokens records soft-noise and its sigma: the
    server's default, as hrpo.eval's; flags replace what they name (hrpo.serve passes its
    parsed flags as latent=)."""
    torch.manual_seed(0)
    model, _ = load_base_model(None, torch.device("cpu"), torch.float32)
    hm = build_policy(model, config_for("arith", lora_rank=4, lora_alpha=8))
    meta = {"method": "soft-tokens", "latent_mode": "soft-noise", "noise_std": 0.25, "hybrid": True}
    path = save_checkpoint(hm, tmp_path / "soft", base_model=None, extra=meta)
    llm = LLM(str(path), max_batch=2, max_model_len=64)
    assert llm.latent == LatentParams("soft-noise", noise_std=0.25)
    req = llm.request(llm.text_prompt("hi"), max_tokens=2)
    assert req.hybrid and req.latent == LatentParams("soft-noise", noise_std=0.25)
    assert LLM(str(path), max_batch=2, latent=latent_flags(["--noise-std", "0.5"])).latent == LatentParams(
        "soft-noise", noise_std=0.5
    )
    assert LLM(max_batch=2, latent=latent_flags([])).latent == LatentParams()  # the base model: hrpo


def test_a_client_that_leaves_mid_stream_cancels_its_rows(server):
    before = server.metrics()
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 130,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metrics()["hrpo_running_rows"] == 1
    m = server.idle()
    for name in ('hrpo_requests_total{outcome="cancelled"}', "hrpo_dropped_requests_total"):
        assert m[name] == before[name] + 1, name


def test_full_queue_503_then_sigterm_mid_stream_exits_0():
    srv = Server("--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "2", key=None)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")  # the one row decodes

            waiting = threading.Thread(
                target=lambda: httpx.post(
                    srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
                )
            )
            waiting.start()
            for _ in range(50):
                if srv.metrics()["hrpo_waiting_requests"] == 1:
                    break
                time.sleep(0.1)
            full = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["code"] == "overloaded"
            assert srv.metrics()['hrpo_requests_total{outcome="rejected"}'] == 1
            t0 = time.time()
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream ends: finished or cut when the shutdown timeout passes
            waiting.join(30)
        assert srv.proc.wait(30) == 0 and time.time() - t0 < 20
        events = [line for line in rest if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert "Traceback" not in srv.proc.stderr.read()
    finally:
        srv.stop()


def test_python_api_and_light_imports():
    code = (
        "import sys, hrpo; assert 'torch' not in sys.modules, 'import hrpo pulled torch'\n"
        "import hrpo.serve; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules\n"
        "llm = hrpo.serve.LLM(max_batch=4)\n"
        "out = llm.generate(['What is 2 + 3?', 'Hello'], max_tokens=6, n=2)\n"
        "assert [len(o) for o in out] == [2, 2] and all(c.finish_reason == 'length' for o in out for c in o)\n"
        "assert out[0][0].text == out[0][1].text  # greedy\n"
        "print(hrpo.serve.generate(['What is 2 + 3?'], max_tokens=6)[0] == out[0][0].text)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


def test_flags_checked_before_loading_and_loopback_detection(capsys):
    for argv, flag in [
        (["--max-batch", "0"], "--max-batch"),
        (["--port", "70000"], "--port"),
        (["--temperature", "0"], "--temperature"),
    ]:
        assert serve_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and flag in err and len(err.splitlines()) == 1
    assert all(loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
