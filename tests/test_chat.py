"""The chat REPL: settings commands, streamed stories, expert display, Ctrl-C, and a real pipe."""

import io
import os
import subprocess
import sys

import pytest
import torch

from nanomoe.chat import ChatSession, ChatSettings, run
from nanomoe.data.tokenizer import train_bpe_tokenizer
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.training.checkpoint import save_checkpoint

STORIES = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball in the garden.",
    "One day Lily went to the park with her mom. She saw a big dog and a small bird. They were happy.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(STORIES * 4, vocab_size=300)


def make_model(tokenizer, **changes):
    torch.manual_seed(0)
    return GPT(get_preset("debug", vocab_size=tokenizer.vocab_size, **changes)).eval()


def session_for(tokenizer, **changes):
    out = io.StringIO()
    return ChatSession(make_model(tokenizer, **changes), tokenizer, ChatSettings(max_new_tokens=10), out=out), out


def test_commands_change_the_settings_and_bad_values_keep_them(tokenizer):
    session, out = session_for(tokenizer)
    lines = ["/temp 0.7", "/topk 40", "/topp 0.9", "/max 30", "/seed 1", "/rep 1.2", "/stop The end"]
    run(session, lines)
    s = session.settings
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens, s.seed, s.repetition_penalty) == (0.7, 40, 0.9, 30, 1, 1.2)
    assert s.stop_strings == ("The end",)
    run(session, ["/temp -1", "/topk many", "/topp 2", "/max 0", "/frobnicate", "/topk off", "/seed off"])
    assert (s.temperature, s.top_p, s.max_new_tokens) == (0.7, 0.9, 30)  # bad values changed nothing
    assert s.top_k is None and s.seed is None
    text = out.getvalue()
    assert "error: expected a temperature" in text and "unknown command /frobnicate" in text
    run(session, ["/help"])
    assert "/experts on" in out.getvalue() and "Ctrl-C" in out.getvalue()


def test_a_prompt_streams_a_story_with_its_speed(tokenizer):
    session, out = session_for(tokenizer)
    run(session, ["/seed 5", "Once upon a time", "Once upon a time", "/temp 0", ""])
    lines = out.getvalue().splitlines()
    stories = [line for line in lines if line.startswith("Once upon a time")]
    assert len(stories) == 2 and stories[0] == stories[1]  # same seed, same story
    assert len(stories[0]) > len("Once upon a time")
    assert sum("tokens/s" in line for line in lines) == 3  # the empty line told a story from scratch


def test_quit_ends_the_session(tokenizer):
    session, out = session_for(tokenizer)
    run(session, ["/quit", "Once upon a time"])
    assert "tokens/s" not in out.getvalue()


def test_experts_on_shows_each_tokens_experts(tokenizer):
    session, out = session_for(tokenizer)
    run(session, ["/temp 0", "/experts on", "The cat"])
    text = out.getvalue()
    story = next(line for line in text.splitlines() if line.startswith("The cat"))
    labels = [part.split("]")[0] for part in story.split("[")[1:]]
    assert len(labels) >= 9  # every new token but the last is annotated (its routing comes one step later)
    for label in labels:
        layers = label.split("|")
        assert len(layers) == 2  # the debug model has 2 MoE layers
        assert all(len(ids.split(",")) == 2 and all(0 <= int(e) < 4 for e in ids.split(",")) for ids in layers)
    assert "layer 0 experts:" in text and "layer 1 experts:" in text
    run(session, ["/experts layer 1", "The cat", "/experts layer 7"])
    story = [line for line in out.getvalue().splitlines() if line.startswith("The cat")][-1]
    assert "|" not in story and "[" in story
    assert "layer 7 is not an MoE layer" in out.getvalue()


def test_compiled_chat_decodes_natively_with_the_same_story_and_experts(tokenizer, native_extension):
    """--compile on the CPU: the native step (MoE included) tells the same greedy story, experts shown."""
    eager, eager_out = session_for(tokenizer)
    native_out = io.StringIO()
    native = ChatSession(make_model(tokenizer, kernels="native"), tokenizer, ChatSettings(max_new_tokens=10),
                         out=native_out, compile=True)
    for session in (eager, native):
        run(session, ["/temp 0", "/experts on", "The cat"])
    assert native.decoder is not None and native.decoder.backend == "native"

    def story(text):  # the streamed story line, experts included (tokens/s differ and are dropped)
        return next(line for line in text.splitlines() if line.startswith("The cat"))

    assert story(native_out.getvalue()) == story(eager_out.getvalue())


def test_experts_on_a_dense_model_explains_why_not(tokenizer):
    session, out = session_for(tokenizer, n_experts=0)
    run(session, ["/experts on"])
    assert "dense" in out.getvalue() and not session.settings.show_experts


def test_ctrl_c_stops_the_story_and_the_session_goes_on(tokenizer, monkeypatch):
    session, out = session_for(tokenizer)
    session.settings.max_new_tokens = 40
    calls = {"n": 0}
    head = session.model.lm_head  # runs once per forward pass: for the prompt, then for every new token
    forward = head.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(head, "forward", interrupted)
    run(session, ["Once upon a time", "/max 3", "The dog"])
    text = out.getvalue()
    assert "(stopped)" in text
    assert "[4 tokens" in text  # the prompt's pass and 3 steps gave 4 tokens; the 5th pass was interrupted
    assert text.count("tokens/s") == 2 and "max_new_tokens = 3" in text
    assert not session.model.training


def test_chat_through_a_pipe(tmp_path, tokenizer):
    model = make_model(tokenizer)
    save_checkpoint(tmp_path, "step-00000000", model_state=model.state_dict(), model_config=model.config,
                    trainer_state={"step": 0}, tokenizer_json=tokenizer.to_json_str(), pointers={"latest": {}})
    script = "/temp 0\n/max 8\nOnce upon a time\n/experts on\nThe dog\n/topk nope\n"  # ends without /quit
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1")
    result = subprocess.run([sys.executable, "-m", "nanomoe", "chat", "--checkpoint", str(tmp_path)], input=script,
                            capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "> Once upon a time\nOnce upon a time" in out  # each input line is echoed, then the story
    assert "> The dog\nThe dog" in out and out.count("tokens/s") == 2
    assert "error: expected a number of tokens" in out
    assert "\033[" not in out  # no colors in a pipe
