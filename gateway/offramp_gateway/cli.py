"""``offramp-openai``: run the gateway with uvicorn in front of a running Triton server.

``offramp serve --openai-port 9000`` starts it with ``--exit-with-pid`` set to its own process,
so the gateway also ends when the server's process is gone (even one killed without a chance to
stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from offramp_gateway.app import create_app
from offramp_gateway.prompts import PromptRenderer
from offramp_gateway.triton import TritonBackend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp-openai", description="OpenAI-compatible API for Offramp on Triton.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC address (host:port)")
    parser.add_argument("--triton-model", default="offramp", help="the Triton model requests go to")
    parser.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="a name clients use in 'model' (default: the Triton model's name); repeat for aliases",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the served checkpoint ('default', a directory or a GGUF file): its chat template renders "
        "histories of more than one message (without it only single user messages are accepted)",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504")
    parser.add_argument("--exit-with-pid", type=int, default=None, help="stop when this process is gone")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _serve(server, parent: int | None) -> None:
    """Run uvicorn; stop it when ``parent`` dies (or when this process is re-parented)."""
    task = asyncio.ensure_future(server.serve())
    original_parent = os.getppid()
    while parent is not None and not task.done():
        if not _alive(parent) or (parent == original_parent and os.getppid() != original_parent):
            print(f"offramp-openai: process {parent} is gone; stopping", file=sys.stderr, flush=True)
            server.should_exit = True
            break
        await asyncio.sleep(1.0)
    await task


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    if args.request_timeout <= 0:
        print("offramp-openai: --request-timeout must be positive", file=sys.stderr)
        return 2
    models = args.served_model_name or [args.triton_model]
    backend = TritonBackend(args.triton_url, args.triton_model, args.request_timeout)
    app = create_app(backend, PromptRenderer(args.model), models)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    asyncio.run(_serve(server, args.exit_with_pid))
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
