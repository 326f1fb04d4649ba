"""``offramp-client``: generate or stream from an Offramp model in Triton, with per-token exit depths;
``chat`` holds a multi-turn conversation with ``offramp_chat`` (gRPC, one sequence id)."""

from __future__ import annotations

import argparse
import json
import sys

from offramp_client.client import OfframpClient, OfframpError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offramp-client", description="Talk to an Offramp model served by Triton.")
    p.add_argument("--url", default=None, help="host:port (default localhost:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http", help="chat always uses grpc")
    p.add_argument("--model", default=None, help="default offramp (generate, stream), offramp_chat (chat)")
    sub = p.add_subparsers(dest="command", required=True)
    commands = (
        ("generate", "one response with the whole text"),
        ("stream", "print tokens as they come"),
        ("chat", "a conversation: messages from --message flags, else lines from stdin; END on exit"),
    )
    for name, help_text in commands:
        s = sub.add_parser(name, help=help_text)
        if name == "chat":
            s.add_argument("--message", action="append", default=None, help="a user turn (repeat for more)")
            s.add_argument("--sequence-id", type=int, default=None, help="the conversation's id (default: a new one)")
        else:
            s.add_argument("prompt")
        s.add_argument("--max-tokens", type=int, default=None)
        s.add_argument("--temperature", type=float, default=None)
        s.add_argument("--top-p", type=float, default=None)
        s.add_argument("--top-k", type=int, default=None)
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--stop", action="append", default=None)
        s.add_argument("--exit-policy", default=None)
        s.add_argument("--exit-threshold", type=float, default=None)
        s.add_argument("--show-exits", action="store_true", help="print the depth each token left at")
        s.add_argument("--json", action="store_true", help="print one JSON object at the end")
        if name == "stream":
            s.add_argument(
                "--cancel-after",
                type=int,
                default=None,
                metavar="N",
                help="cancel the request after N responses (the server frees its pages)",
            )
    args = p.parse_args(argv)
    protocol = "grpc" if args.command == "chat" else args.protocol
    url = args.url or ("localhost:8001" if protocol == "grpc" else "localhost:8000")
    model = args.model or ("offramp_chat" if args.command == "chat" else "offramp")
    client = OfframpClient(url, protocol, model)
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "exit_policy": args.exit_policy,
        "exit_threshold": args.exit_threshold,
    }
    if args.command == "chat":
        return _chat(client, args, params)
    try:
        if args.command == "generate":
            result = client.generate(args.prompt, **params)
            chunks_text, layers, reason = result.text, result.exit_layers, result.finish_reason
            if not args.json:
                print(result.text)
        else:
            pieces, layers, reason = [], [], ""
            stream = client.stream(args.prompt, **params)
            for count, chunk in enumerate(stream, 1):
                pieces.append(chunk.text)
                layers.extend(chunk.exit_layers)
                reason = chunk.finish_reason or reason
                if not args.json:
                    print(chunk.text, end="", flush=True)
                if args.cancel_after is not None and count >= args.cancel_after:
                    stream.close()  # closes the stream: the server aborts the request
                    reason = "cancelled"
                    break
            chunks_text = "".join(pieces)
            if not args.json:
                print()
    except (OfframpError, OSError) as exc:
        print(f"offramp-client: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": chunks_text, "finish_reason": reason, "exit_layers": layers}, ensure_ascii=False))
    elif args.show_exits:
        print(f"[finish_reason={reason}; exit layers: {layers}]", file=sys.stderr)
    return 0


def _chat(client: OfframpClient, args: argparse.Namespace, params: dict) -> int:
    """Turns from ``--message`` flags, else one per stdin line (``/quit`` or EOF ends); each reply
    streams to stdout. The conversation is closed (END) on every way out. In the interactive mode a
    failed turn prints its error and the conversation goes on."""
    interactive = args.message is None
    turns, code = [], 0
    try:
        with client.chat(args.sequence_id) as session:
            for message in _stdin_lines() if interactive else args.message:
                try:
                    turns.append(_chat_turn(session, message, params, args))
                except OfframpError as exc:
                    print(f"offramp-client: error: {exc}", file=sys.stderr)
                    if not interactive:
                        code = 1
                        break
    except (OfframpError, OSError) as exc:
        print(f"offramp-client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # leaving the with block sent END
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({"sequence_id": session.sequence_id, "turns": turns}, ensure_ascii=False))
    return code


def _chat_turn(session, message: str, params: dict, args: argparse.Namespace) -> dict:
    pieces, layers, reason, cached = [], [], "", 0
    for chunk in session.send(message, **params):
        pieces.append(chunk.text)
        layers.extend(chunk.exit_layers)
        reason, cached = chunk.finish_reason or reason, chunk.num_cached_tokens
        if not args.json:
            print(chunk.text, end="", flush=True)
    if not args.json:
        print()
        if args.show_exits:
            print(f"[finish_reason={reason}; cached prompt tokens: {cached}; exit layers: {layers}]", file=sys.stderr)
    text = "".join(pieces)
    return {"user": message, "text": text, "finish_reason": reason, "exit_layers": layers, "num_cached_tokens": cached}


def _stdin_lines():
    prompt = "you> " if sys.stdin.isatty() else ""
    while True:
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        if line.strip():
            yield line.rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
