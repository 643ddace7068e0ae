"""`nanomoe serve`: an OpenAI-compatible HTTP server with continuous batching, and a playground."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from . import add_command
from .generate import add_model_args, load_for_generation


def build_server(args):
    """The uvicorn server for the parsed arguments (the model loaded), not yet running."""
    import uvicorn

    from ..errors import ConfigError
    from ..serve.app import create_app
    from ..serve.scheduler import Scheduler

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty: give a key, or leave the option out for no key")
    ckpt = load_for_generation(args)
    scheduler = Scheduler(ckpt.model, ckpt.tokenizer, args.max_batch, native=not args.no_native)
    name = args.name or Path(args.checkpoint).resolve().name
    app = create_app(scheduler, model_name=name, api_key=args.api_key, grace_s=args.grace)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace + 5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGINT/SIGTERM: stop taking requests, let the running ones finish for --grace seconds
            (then they end with finish_reason "cancelled"), and exit 0 (uvicorn would re-raise the
            signal once it has shut down)."""
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            threading.Thread(target=scheduler.close, args=(args.grace,), daemon=True).start()

    print(f"nanomoe: serving {name} ({scheduler.engine.backend} decode step, {args.max_batch} rows) on "
          f"http://{args.host}:{args.port}/ (playground) and http://{args.host}:{args.port}/v1", file=sys.stderr)
    return Server(config)


def cmd_serve(args) -> int:
    """Serve a checkpoint over HTTP: the OpenAI API (completions, chat, models) and a playground.

    Requests share one running batch (continuous batching, up to --max-batch sequences): a new
    request starts at the next token, without waiting for others to finish. Open
    http://127.0.0.1:8000/ for the playground; point any OpenAI client at http://127.0.0.1:8000/v1.
    Ctrl-C (or SIGTERM) stops taking requests, lets running ones finish for --grace seconds, exits 0.

    Examples:
      nanomoe serve --checkpoint runs/tiny-moe
      curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "Once upon a time", "max_tokens": 50, "seed": 1}'
    """
    server = build_server(args)
    server.run()
    return 0


def add_serve_args(p) -> None:
    add_model_args(p, server=True)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most (default 32)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the checkpoint dir's name)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds running requests may finish in after SIGINT/SIGTERM (default 10)")
    p.add_argument("--no-native", action="store_true", help="decode with PyTorch, not the native C++ step")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")


def register(subparsers) -> None:
    p = add_command(subparsers, "serve", cmd_serve)
    add_serve_args(p)
