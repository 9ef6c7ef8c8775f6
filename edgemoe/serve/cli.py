"""`edgemoe serve`: the OpenAI-compatible server (needs the `server` extra)."""

from __future__ import annotations

import os

from edgemoe.cli_args import count, size
from formats.errors import EmoeError


def add_parser(sub) -> None:
    """Add `serve` to the `edgemoe` subcommands."""
    s = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching and a live page",
        description="Serve a .emoe over HTTP inside a memory budget: /v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics and a chat page at /.",
    )
    s.add_argument("model", nargs="?", help="the .emoe (default: the bundled demo model)")
    s.add_argument(
        "--mem", type=size, help="memory budget for the whole server, e.g. 4GB (default: unlimited)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument(
        "--port", type=count(0, 65535), default=8080, help="port (default 8080; 0: any free one)"
    )
    s.add_argument(
        "--max-batch",
        type=count(1, 4096),
        default=4,
        help="sequences generated at once; their KV cache is planned into --mem (default 4)",
    )
    s.add_argument(
        "--max-queue",
        type=count(0),
        default=32,
        help="requests that may wait for a slot; more are refused with 503 (default 32)",
    )
    s.add_argument(
        "--ctx",
        type=count(1),
        help="context per sequence, prompt + reply (default: min(model, 2048))",
    )
    s.add_argument(
        "--api-key",
        default=os.environ.get("EDGEMOE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 and /api (default: $EDGEMOE_API_KEY)",
    )
    s.add_argument("--device", help="emulate a device profile: its memory, flash and compute speed")
    s.add_argument(
        "--expert-cache",
        help="size the expert cache ('3MiB', or '33%%' of all experts) instead of all the room "
        "--mem leaves: shows paging on any machine",
    )
    s.add_argument("--dtype", default="auto", help="auto, f32 or bf16")
    s.add_argument("--level", type=count(1), help="expert precision level (default: the highest)")
    s.add_argument("--threads", type=count(1, 256), default=2, help="I/O threads (default 2)")
    s.add_argument(
        "--compute-threads",
        type=count(1, 1024),
        help="threads torch computes with (default: torch's, one per core); 1 can be faster "
        "on cores other work keeps busy",
    )
    s.add_argument("--name", help="the model id clients send (default: the file's stem)")
    s.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="do not keep a conversation's KV for its next turn",
    )
    s.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default="continuous",
        help="static: a batch runs to its end before others join (the baseline)",
    )
    s.set_defaults(fn=_cmd_serve)


def _cmd_serve(args) -> int:
    try:
        from edgemoe.serve.app import ServeConfig, serve
    except ImportError as e:
        raise EmoeError(
            f"edgemoe serve needs {e.name or 'the server libraries'}",
            "pip install 'edgemoe[server]'",
        ) from None
    cfg = ServeConfig(
        model=args.model,
        mem=args.mem,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        ctx=args.ctx,
        api_key=args.api_key or None,
        device=args.device,
        dtype=args.dtype,
        level=args.level,
        threads=args.threads,
        name=args.name,
        prefix_reuse=not args.no_prefix_reuse,
        static_batching=args.batching == "static",
        expert_cache=args.expert_cache,
        compute_threads=args.compute_threads,
    )
    return serve(cfg)
