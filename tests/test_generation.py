"""Generation: KV cache vs no cache, sampling options, stop tokens and strings, batched prompts of
different lengths, streaming text, the `generate` command and the generation benchmark."""

import json

import pytest
import torch

from nanomoe.cli import main
from nanomoe.data.tokenizer import train_bpe_tokenizer
from nanomoe.errors import ConfigError
from nanomoe.generation import (
    Decoder,
    IncrementalDecoder,
    apply_repetition_penalty,
    generate,
    generate_batch,
    sample_next,
    stream,
    stream_text,
)
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.training.checkpoint import save_checkpoint

ARCHITECTURES = {
    "moe": dict(),  # debug: rope, rmsnorm, swiglu, top-2 MoE
    "classic": dict(position="learned", norm="layernorm", ffn="relu", bias=True, router="noisy_topk"),
    "gqa-switch": dict(ffn="gelu", router="switch", top_k=1, n_kv_head=2, n_shared_experts=1, moe_every=2),
    "capacity": dict(capacity_factor=0.5),
    "dense": dict(n_experts=0),
}

STORIES = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball in the garden.",
    "One day Lily went to the park with her mom. She saw a big dog and a small bird. They were happy.",
    "The sun was hot, so Ben ate a cold ice cream. Then he went home and took a long nap.",
    "A café in the town sold naïve pictures of snowmen ☃ and cats 🐱 to every child who came by.",
]


def make_model(arch: str = "moe", **changes) -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("debug", **{**ARCHITECTURES[arch], **changes})).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(STORIES * 4, vocab_size=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A checkpoint of a random debug MoE model with a real tokenizer (speed and plumbing, not prose)."""
    run = tmp_path_factory.mktemp("run")
    model = make_model(vocab_size=tokenizer.vocab_size)
    save_checkpoint(run, "step-00000000", model_state=model.state_dict(), model_config=model.config,
                    trainer_state={"step": 0}, tokenizer_json=tokenizer.to_json_str(), pointers={"latest": {}})
    return run


# ---------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_with_kv_cache_equals_greedy_without(arch):
    model = make_model(arch)
    idx = torch.randint(4, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, idx, 40, temperature=0)
    uncached = generate(model, idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, 47)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], idx)


@pytest.mark.parametrize("arch", ["moe", "classic", "dense"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(arch):
    model = make_model(arch)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
    batched = generate_batch(model, prompts, 25, temperature=0)
    alone = [generate_batch(model, [p], 25, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert generate_batch(model, prompts, 25, temperature=0, use_cache=False) == alone
    # and the ragged path agrees with the rectangular one
    for p, new in zip(prompts, alone):
        assert generate(model, torch.tensor([p]), 25, temperature=0)[0, len(p):].tolist() == new


def test_model_generate_is_generate():
    # the original NanoGPT-MoE TinyStories project's call: model.generate(idx, max_new_tokens, ...)
    model = make_model("moe")
    idx = torch.randint(4, 512, (2, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(idx, 12, temperature=0.9, top_k=20, seed=5),
                       generate(model, idx, 12, temperature=0.9, top_k=20, seed=5))


def test_top_k_1_equals_greedy():
    model = make_model()
    idx = torch.randint(4, 512, (3, 5), generator=torch.Generator().manual_seed(2))
    greedy = generate(model, idx, 30, temperature=0)
    assert torch.equal(generate(model, idx, 30, temperature=1.3, top_k=1, seed=7), greedy)
    assert torch.equal(generate(model, idx, 30, temperature=1.3, top_p=1e-6, seed=7), greedy)


def test_same_seed_same_sample_and_another_seed_another_sample():
    model = make_model()
    idx = torch.tensor([[1, 2, 3]] * 2)
    opts = dict(temperature=1.0, top_k=100, top_p=0.95)
    a = generate(model, idx, 30, seed=11, **opts)
    assert torch.equal(a, generate(model, idx, 30, seed=11, **opts))
    assert not torch.equal(a, generate(model, idx, 30, seed=12, **opts))
    assert not torch.equal(a[0], a[1])  # rows of one batch draw different samples
    # the global RNG is not what makes a seeded sample repeat
    torch.manual_seed(123)
    assert torch.equal(a, generate(model, idx, 30, seed=11, **opts))


def test_stop_token_ends_each_row_and_the_batch():
    model = make_model()
    idx = torch.randint(4, 512, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, idx, 30, temperature=0)[:, 4:]
    stop = free[0, 5].item()  # a token row 0 produces at its 6th step
    first = (free[0] == stop).nonzero()[0].item()
    out = generate(model, idx, 30, temperature=0, stop_id=stop)[:, 4:]
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first:] == stop).all()  # a stopped row keeps emitting the stop token
    new = generate_batch(model, idx.tolist(), 30, temperature=0, stop_ids=[stop])
    assert new[0] == free[0, :first].tolist()  # without the stop token
    hits = (free[1] == stop).nonzero()
    assert new[1] == (free[1, : hits[0].item()] if len(hits) else free[1]).tolist()
    if not len(hits):  # only row 0 stops: the batch runs on for row 1
        assert out.shape[1] == 30
    # when every row stops, generation ends early
    solo = generate(model, idx[:1], 30, temperature=0, stop_id=stop)
    assert solo.shape[1] == 4 + first + 1


def test_stream_reports_experts_of_each_fed_token_and_stopped_rows():
    model = make_model()
    steps = list(stream(model, [[1, 2, 3], [4]], 6, temperature=0))
    assert len(steps) == 6
    for step in steps:
        assert len(step.experts) == model.config.n_layer  # one entry per MoE layer
        assert all(e.shape == (2, model.config.top_k) for e in step.experts)
    # the experts of step i+1 are the routing of step i's token: rerunning the sequence agrees
    seq = [1, 2, 3] + [steps[0].tokens[0]]
    with torch.no_grad():
        out = model(torch.tensor([seq]))
    for layer, stats in enumerate(out.moe):
        assert stats.expert_indices[-1].tolist() == steps[1].experts[layer][0].tolist()


def test_decoder_refuses_what_does_not_fit():
    model = make_model()
    with pytest.raises(ConfigError, match="block_size"):
        Decoder(model, 1, model.config.block_size + 1)
    dec = Decoder(model, 1, 8)
    with torch.inference_mode(), pytest.raises(ConfigError, match="no room"):
        dec.prefill([list(range(8))])
    with pytest.raises(ConfigError, match="at least one token"):
        generate_batch(model, [[1], []], 3)
    with pytest.raises(ConfigError, match="temperature"):
        generate_batch(model, [[1]], 3, temperature=-1)
    # prompt + new tokens are cut to block_size
    out = generate(model, torch.ones(1, 60, dtype=torch.long), 50, temperature=0)
    assert out.shape == (1, model.config.block_size)


def test_generate_keeps_the_training_mode_and_runs_under_autocast():
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, torch.tensor([[1, 2]]), 5, temperature=0.8, top_k=50, stop_id=0, seed=0)
    assert out.shape[1] <= 7 and model.training


# ---------------------------------------------------------------------------------------------
# Sampling


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    draws = {sample_next(logits, 1.0, top_k=3, generator=g).item() for _ in range(300)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("top_k", [None, 40])
def test_one_generator_per_row_draws_what_each_row_draws_alone(top_k):
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 3
    batched = [torch.Generator().manual_seed(10 + b) for b in range(5)]
    alone = [torch.Generator().manual_seed(10 + b) for b in range(5)]
    for _ in range(50):  # every row's generator advances as it would alone
        together = sample_next(logits, 0.8, top_k, generator=batched).tolist()
        assert together == [sample_next(logits[b:b + 1], 0.8, top_k, generator=alone[b]).item() for b in range(5)]
    with pytest.raises(ConfigError, match="3 generators for 5 rows"):
        sample_next(logits, 0.8, generator=batched[:3])


def test_draws_follow_the_probabilities_and_never_pick_an_impossible_token():
    from nanomoe.generation import _draw

    probs = torch.tensor([[0.0, 0.5, 0.3, 0.0, 0.15, 0.05, 0.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([_draw(probs, g) for _ in range(20000)]).flatten(), minlength=7)
    freq = counts.float() / counts.sum()
    assert counts[[0, 3, 6]].sum() == 0
    assert torch.allclose(freq, probs[0], atol=0.015)


def test_top_p_shortlist_samples_exactly_like_a_full_sort(monkeypatch):
    import nanomoe.generation as generation

    torch.manual_seed(0)
    logits = torch.randn(3, 512) * 3  # peaked enough that the top 64 hold 0.9 in every row
    full = []
    for shortlist in (64, 10_000):  # 10_000 > vocabulary: always the full sort
        monkeypatch.setattr(generation, "NUCLEUS_SHORTLIST", shortlist)
        g = torch.Generator().manual_seed(5)
        full.append([sample_next(logits, 1.0, top_p=0.9, generator=g).tolist() for _ in range(200)])
    assert full[0] == full[1]


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -1.0, 1.9, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    penalized = apply_repetition_penalty(logits, seen, 1.5)
    assert torch.allclose(penalized, torch.tensor([[2.0 / 1.5, -1.5, 1.9, 0.5]]))
    assert sample_next(logits, 0.0).item() == 0
    assert sample_next(logits, 0.0, repetition_penalty=1.5, seen=seen).item() == 2


def test_repetition_penalty_reduces_repeats_in_generation():
    model = make_model("dense")
    prompt = [[1, 2, 3]]
    plain = generate_batch(model, prompt, 40, temperature=0)[0]
    penalized = generate_batch(model, prompt, 40, temperature=0, repetition_penalty=5.0)[0]
    assert len(set(penalized)) > len(set(plain))


# ---------------------------------------------------------------------------------------------
# Text


def test_incremental_decoding_never_splits_a_character(tokenizer):
    text = " A café with naïve snowmen ☃ and cats 🐱."
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.add(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_strings_cut_the_text_before_them(tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    prompt = "Once upon a time"
    free = "".join(p for s in stream_text(model, tokenizer, [prompt], 40, temperature=0) for p in s.pieces)
    assert len(free) > 20
    stop = free[10:13]  # some text from the middle of the continuation
    cut = "".join(p for s in stream_text(model, tokenizer, [prompt], 40, temperature=0, stop_strings=[stop])
                  for p in s.pieces)
    assert cut == free[: free.index(stop)]
    # rows of a batch stop independently
    steps = list(stream_text(model, tokenizer, [prompt, "The dog"], 40, temperature=0, stop_strings=[stop]))
    texts = ["".join(s.pieces[r] for s in steps) for r in range(2)]
    assert texts[0] == cut
    assert stop not in texts[1]


# ---------------------------------------------------------------------------------------------
# The compiled decode step


@pytest.fixture
def torch_compile(monkeypatch):
    """compile=True through torch.compile, not the native step (tests/test_native_decode.py has that):
    models built with the torch kernels."""
    monkeypatch.setenv("NANOMOE_KERNELS", "torch")


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens(torch_compile):
    model = make_model("dense", n_layer=1)
    for prompts in ([[1, 2, 3, 4], [5, 6]], [[7, 8, 9]]):  # batched (attention kernel) and one row (fused loops)
        eager = generate_batch(model, prompts, 12, temperature=0)
        assert generate_batch(model, prompts, 12, temperature=0, compile=True) == eager
    # a second model of the same shape must not run on the first one's frozen weights
    torch.manual_seed(1)
    other = GPT(model.config).eval()
    prompts = [[7, 8, 9]]
    eager = generate_batch(other, prompts, 12, temperature=0)
    assert eager != generate_batch(model, prompts, 12, temperature=0)  # the check below can tell them apart
    assert generate_batch(other, prompts, 12, temperature=0, compile=True) == eager


@pytest.mark.slow
def test_attention_span_grows_with_the_cache_and_changes_no_token(torch_compile):
    model = make_model("dense", n_layer=1, block_size=128)
    decoder = Decoder(model, batch_size=2, max_len=128)
    with torch.inference_mode():
        decoder.prefill([[1, 2, 3], [4, 5, 6, 7, 8]])
    assert decoder._span() == 64  # the written slots rounded up to 64, not the whole cache
    decoder.next_slot = 64
    assert decoder._span() == 128
    # across the 64 boundary: the same tokens as without a cache, eager and compiled (two spans)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    reference = generate_batch(model, prompts, 110, temperature=0, use_cache=False)
    assert generate_batch(model, prompts, 110, temperature=0) == reference
    assert generate_batch(model, prompts, 110, temperature=0, compile=True) == reference


# ---------------------------------------------------------------------------------------------
# Command line


def test_generate_command_streams_a_story(run_dir, capsys):
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "Once upon a time", "--max-new-tokens", "12",
            "--seed", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and len(out) > len("Once upon a time\n")
    assert "tokens/s" in err
    assert main(argv) == 0
    assert capsys.readouterr().out == out  # same seed, same story


def test_generate_command_batches_prompts_and_samples_as_json(run_dir, capsys):
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "The cat", "--prompt", "One day Lily went",
            "--num-samples", "2", "--max-new-tokens", "8", "--temperature", "0", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    samples = report["samples"]
    assert [s["prompt"] for s in samples] == ["The cat", "The cat", "One day Lily went", "One day Lily went"]
    assert samples[0]["text"] == samples[1]["text"]  # greedy: both samples of a prompt agree
    assert all(0 < s["new_tokens"] <= 8 for s in samples)
    assert report["tokens_per_s"] > 0


def test_generate_command_says_when_the_context_window_cut_the_story(run_dir, capsys):
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "The cat", "--max-new-tokens", "500",
            "--temperature", "0", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    sample = json.loads(captured.out)["samples"][0]
    assert sample["stop_reason"] == "context_full" and sample["new_tokens"] < 500
    assert "context of 64 tokens" in captured.err
    argv[argv.index("500")] = "5"  # fits: the limit is the user's
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["samples"][0]["stop_reason"] == "max_new_tokens" and "context" not in captured.err


@pytest.mark.parametrize("bad, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--num-samples", "0"], "num-samples"),
])
def test_generate_command_rejects_bad_settings(run_dir, capsys, bad, message):
    assert main(["generate", "--checkpoint", str(run_dir), *bad]) == 1
    assert message in capsys.readouterr().err


def test_generate_command_explains_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bench_generate_json_has_the_headline_keys(capsys):
    argv = ["bench", "generate", "--preset", "debug-dense", "--new-tokens", "6", "--batch-size", "3",
            "--repeats", "1", "--no-compile", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_s_batch1", "tokens_per_s_batch1_nocache", "tokens_per_s_batch3"):
        assert report[key] > 0, key
    assert report["new_tokens"] == 6 and report["batch_size"] == 3


def test_cli_without_a_seed_tells_a_different_story_each_run_and_reports_its_seed(run_dir, monkeypatch, capsys):
    """torch's global generator starts from the same state in every process: the CLI must not rely on it."""
    import json

    import nanomoe.generation as generation
    from nanomoe.cli import main

    run = run_dir
    seeds = iter([11, 22])
    monkeypatch.setattr(generation, "random_seed", lambda: next(seeds))
    outs = []
    for _ in range(2):
        torch.manual_seed(0)  # as in a fresh process
        assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "30", "--temperature", "1.0",
                     "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [o["seed"] for o in outs] == [11, 22]
    assert outs[0]["samples"][0]["text"] != outs[1]["samples"][0]["text"]
