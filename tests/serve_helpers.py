"""A checkpoint and a live `nanomoe serve` on a free 127.0.0.1 port, for the server and playground tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request

import torch

from nanomoe.cli import build_parser
from nanomoe.cli.serve import build_server
from nanomoe.data.tokenizer import train_bpe_tokenizer
from nanomoe.model import GPT
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt

STORIES = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball in the garden.",
    "One day Lily went to the park with her mom. She saw a big dog and a small bird. They were happy.",
]


def save_run(path, preset: str = "debug", **changes):
    """A randomly initialised model with its tokenizer, saved as a run directory."""
    tokenizer = train_bpe_tokenizer(STORIES * 4, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(get_preset(preset, vocab_size=tokenizer.vocab_size, block_size=128, **changes))
    ckpt.save_checkpoint(path, ckpt.checkpoint_name(1), model_state=model.state_dict(), model_config=model.config,
                         trainer_state={"step": 1}, tokenizer_json=tokenizer.to_json_str(), pointers={"latest": {}})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(run, *extra: str):
    """`nanomoe serve` in a thread; yields its base URL; stops it at the end."""
    port = free_port()
    threads = torch.get_num_threads()  # the server sets the process's threads: restored at the end
    args = build_parser().parse_args(["serve", "--checkpoint", str(run), "--port", str(port), "--max-batch", "8",
                                      "--log-level", "warning", "--grace", "2", *extra])
    server = build_server(args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        torch.set_num_threads(threads)
        assert not thread.is_alive(), "the server did not stop"


def get_json(url: str, headers: dict | None = None):
    import json

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
        return json.load(r)
