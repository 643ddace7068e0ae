"""`nanomoe serve`: the engine against plain generation, the OpenAI API through the official client
against a live server on 127.0.0.1, bad input while another client streams, SIGTERM, `bench serve`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import free_port, get_json, live_server, save_run

from nanomoe.cli import main
from nanomoe.generation import generate_batch
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.serve.engine import Engine

KEY = "test-key"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ---------------------------------------------------------------------------------------------
# The engine: sequences joining and leaving one cache give the tokens they give alone


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_engine_matches_generation_alone_while_sequences_come_and_go(native, request):
    if native:
        request.getfixturevalue("native_extension")
    torch.manual_seed(0)
    # the native decode step belongs to the native kernels: ask for them whatever the default
    kernels = {"kernels": "native"} if native else {}
    model = GPT(get_preset("debug", vocab_size=300, block_size=48, **kernels)).eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(1, 20))] for _ in range(9)]
    budgets = [rng.randint(3, 48 - len(p)) for p in prompts]
    expected = [generate_batch(model, [p], n, temperature=0)[0] for p, n in zip(prompts, budgets)]
    out: dict[int, list[int]] = {}
    waiting, steps, most = list(range(len(prompts))), 0, 0
    with torch.inference_mode():
        engine = Engine(model, 4, native=native)
        assert engine.backend == ("native" if native else "eager")
        while waiting or len(engine):
            if waiting and len(engine) < 4:  # at most one joins per step: joins land at many slots
                i = waiting.pop(0)
                logits, _ = engine.add(i, prompts[i])
                out[i] = [int(logits.argmax())]
            most = max(most, len(engine))
            seqs, logits, experts = engine.step({s: out[s][-1] for s in engine.rows})
            assert [e.shape for e in experts] == [(len(seqs), 2)] * 2
            for s, row in zip(seqs, logits):
                if len(out[s]) < budgets[s]:
                    out[s].append(int(row.argmax()))
            for s in seqs:
                if len(out[s]) >= budgets[s]:
                    engine.remove(s)
            steps += 1
    assert most == 4 and steps > 48  # the batch was full, and the shared slot went round the cache
    assert [out[i][:budgets[i]] for i in range(len(prompts))] == expected


def test_engine_logits_do_not_depend_on_the_company(native_extension):
    """A row's logits are the same alone and beside others (what makes seeds reproducible when batched)."""
    torch.manual_seed(0)
    model = GPT(get_preset("debug", vocab_size=300, block_size=64)).eval()
    prompt = [5, 17, 99, 3]
    with torch.inference_mode():
        alone = Engine(model, 4)
        first = alone.add(0, prompt)[0]
        steps_alone = [alone.step({0: t})[1][0] for t in (7, 8, 9)]
        crowd = Engine(model, 4)
        crowd.add(1, [1, 2, 3, 4, 5, 6, 7, 8])
        crowd.step({1: 9})
        assert torch.equal(crowd.add(0, prompt)[0], first)
        crowd.add(2, [42])
        for t, expected in zip((7, 8, 9), steps_alone):
            seqs, logits, _ = crowd.step({0: t, 1: 11, 2: 12})
            torch.testing.assert_close(logits[seqs.index(0)], expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The API through the official client


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("runs") / "story-moe")


@pytest.fixture(scope="module")
def server(run):
    with live_server(run, "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


MODEL = "story-moe"


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = get_json(server + "/health")
    assert health["status"] == "ok" and health["max_batch"] == 8


def test_completion_streaming_gives_the_same_text_and_usage(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=5, temperature=0.9, top_p=0.95)
    whole = client.completions.create(**args)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_top_k_one_is_greedy_and_n_gives_different_choices(client):
    greedy = client.completions.create(model=MODEL, prompt="The dog", max_tokens=8, temperature=0)
    top1 = client.completions.create(model=MODEL, prompt="The dog", max_tokens=8, temperature=1.5, seed=1,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    many = client.completions.create(model=MODEL, prompt="The dog", max_tokens=8, n=3, seed=2, temperature=1.0)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == 24


def test_same_seed_same_text_alone_or_batched(client):
    args = dict(model=MODEL, prompt="Lily went to the park", max_tokens=24, temperature=1.0, seed=11)
    alone = client.completions.create(**args).choices[0].text
    results: dict[int, str] = {}

    def ask(i):
        if i == 0:
            time.sleep(0.05)  # joins a batch already running
            results[i] = client.completions.create(**args).choices[0].text
        else:
            results[i] = client.completions.create(model=MODEL, prompt="A cat" * i, max_tokens=40, seed=i).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == alone
    other = client.completions.create(**{**args, "seed": 12}).choices[0].text
    assert other != alone


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model=MODEL, prompt="Tom", max_tokens=30, temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[3:5]
    cut = client.completions.create(model=MODEL, prompt="Tom", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_turn_tokens(client, run):
    from nanomoe.training.checkpoint import load_checkpoint

    tok = load_checkpoint(run).tokenizer
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Tell stories."},
                                                                   {"role": "user", "content": "A cat"}],
                                           max_tokens=6, seed=3)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    expected_prompt = (["<|im_start|>"] + ["system\nTell stories."] + ["<|im_end|>", "\n", "<|im_start|>"]
                       + ["user\nA cat"] + ["<|im_end|>", "\n", "<|im_start|>", "assistant\n"])
    n_prompt = sum(len(tok.encode(p)) for p in expected_prompt)
    assert reply.usage.prompt_tokens == n_prompt
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A cat"}],
                                              max_tokens=6, seed=3, stream=True)
    deltas = list(streamed)
    assert deltas[0].choices[0].delta.role == "assistant"
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A cat"}],
                                           max_tokens=6, seed=3)
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == again.choices[0].message.content


def test_experts_of_every_token(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=6, seed=4, stream=True,
                                            extra_body={"experts": True}))
    live = [c.choices[0].model_extra["experts"] for c in chunks if c.choices[0].model_extra.get("experts")]
    routing = chunks[-1].choices[0].model_extra["routing"]
    n = len(routing["ids"])
    assert routing["layers"] == [0, 1] and len(routing["tokens"]) == len(routing["experts"]) == n
    assert live == routing["experts"][: len(live)] and len(live) >= n - 1
    for per_layer, weights in zip(routing["experts"], routing["weights"]):
        assert all(len(set(e)) == 2 and all(0 <= x < 4 for x in e) for e in per_layer)
        assert all(w[0] >= w[1] > 0 for w in weights)  # router probabilities, first choice first
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=6, seed=4, extra_body={"experts": True})
    assert whole.choices[0].model_extra["routing"] == routing


# ---------------------------------------------------------------------------------------------
# Bad input: an OpenAI error object and a 4xx, while another client's story goes on


BAD = [
    ("malformed JSON", b'{"prompt": "x", ', 400, None),
    ("unknown field", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens beyond context", {"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ("prompt too long", {"prompt": [5] * 200, "max_tokens": 1}, 400, "prompt"),
    ("temperature < 0", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("top_p 0", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p > 1", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("n too large", {"prompt": "x", "n": 99}, 400, "n"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("token outside vocabulary", {"prompt": [100000]}, 400, "prompt"),
    ("wrong API key", {"prompt": "x"}, 401, None),
]


def test_bad_requests_get_error_objects_while_a_story_streams(server, client):
    story: dict = {}

    def stream_story():
        chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=80, seed=9,
                                                temperature=1.0, stream=True, stream_options={"include_usage": True}))
        story["text"] = "".join(c.choices[0].text for c in chunks if c.choices)
        story["usage"] = chunks[-1].usage

    streamer = threading.Thread(target=stream_story)
    streamer.start()
    time.sleep(0.2)
    with httpx.Client(base_url=server, timeout=30) as http:
        for what, body, status, param in BAD:
            key = "wrong" if what == "wrong API key" else KEY
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post("/v1/completions", content=content, headers=headers)
            assert r.status_code == status, (what, r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"] and (param is None or error["param"] == param), (what, error)
            assert "Traceback" not in error["message"] and "\n" not in error["message"]
        # a client that goes away mid-stream: its sequence is dropped, nothing else notices
        headers = {"Authorization": f"Bearer {KEY}"}
        with http.stream("POST", "/v1/completions", json={"prompt": "Tom", "max_tokens": 100, "stream": True},
                         headers=headers) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        assert http.post("/v1/completions", json={"messages": []}, headers=headers).status_code == 400
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    streamer.join(timeout=120)
    assert story["usage"].completion_tokens == 80 or story["text"]
    alone = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=80, seed=9, temperature=1.0)
    assert story["text"] == alone.choices[0].text  # the same story as without the noise
    deadline = time.time() + 10
    while get_json(server + "/health")["busy"] and time.time() < deadline:  # the dropped stream was freed
        time.sleep(0.05)
    assert get_json(server + "/health")["busy"] == 0


def test_experts_of_a_dense_model_and_playground_page(tmp_path):
    dense = save_run(tmp_path / "dense", "debug-dense")
    with live_server(dense) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "experts": True})
        assert r.status_code == 400 and "dense" in r.json()["error"]["message"]
        ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}).json()
        assert ok["usage"]["completion_tokens"] <= 3  # no key needed without --api-key
        page = httpx.get(url + "/").text
        assert "<title>" in page and "http://" not in page and "https://" not in page and "<script src" not in page


def test_cli_refuses_bad_options(run, capsys):
    assert main(["serve", "--checkpoint", str(run), "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SIGTERM: the running story ends cleanly, the process exits 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_running_story_finish_and_exits_0(run, sig):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "nanomoe", "serve", "--checkpoint", str(run), "--port", str(port),
                             "--grace", "20", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                get_json(url + "/health")
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 60, "stream": True, "temperature": 1.0}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            proc.send_signal(sig)
            rest = [line for line in lines if line.startswith("data:")]
        events = [json.loads(line[5:]) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]"
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_serve_smoke(capsys):
    argv = ["bench", "serve", "--preset", "debug", "--clients", "2", "--seconds", "1.5", "--max-tokens", "8",
            "--max-batch", "4", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for phase, clients in (("single", 1), ("concurrent", 2)):
        r = result[phase]
        assert r["clients"] == clients and r["errors"] == 0 and r["requests"] >= 1
        assert 0 < r["tokens"] <= 8 * r["requests"] and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["inter_token_p50_ms"] <= r["inter_token_p99_ms"]
    assert result["tokens_per_s_ratio"] > 0
