"""`nanomoe chat`: the interactive story REPL (logic in nanomoe/chat.py)."""

from __future__ import annotations

from . import add_command
from .generate import add_model_args, add_sampling_args, load_for_generation, sampling_options


def cmd_chat(args) -> int:
    """Interactive story writing: type a prompt, watch the story stream, change settings with commands.

    Commands inside the chat: /temp 0.7, /topk 40, /topp 0.9, /rep 1.2, /max 300, /seed 1,
    /stop TEXT, /experts on (which experts each token went to), /settings, /help, /quit.
    Each answer ends with its speed in tokens/s. Ctrl-C stops a story, Ctrl-D quits.
    Works with a pipe too: `printf 'Once upon a time\\n/temp 0\\nThe dog\\n' | nanomoe chat --checkpoint RUN`.

    Examples:
      nanomoe chat --checkpoint runs/tiny-moe
      nanomoe chat --checkpoint runs/tiny-moe --temperature 1.0 --top-p 0.9 --compile
    """
    from ..chat import ChatSession, ChatSettings, run

    options = sampling_options(args)
    ckpt = load_for_generation(args)
    settings = ChatSettings(
        temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"],
        repetition_penalty=options["repetition_penalty"], seed=options["seed"],
        max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop), show_experts=args.experts,
    )
    if args.experts and not ckpt.model_config.is_moe:
        settings.show_experts = False
    session = ChatSession(ckpt.model, ckpt.tokenizer, settings, compile=args.compile)
    return run(session)


def register(subparsers) -> None:
    p = add_command(subparsers, "chat", cmd_chat)
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=200)
    p.add_argument("--experts", action="store_true", help="start with /experts on (MoE models)")
