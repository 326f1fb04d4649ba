"""``offramp-client``: generate or stream from an Offramp model in Triton, with per-token exit depths."""

from __future__ import annotations

import argparse
import json
import sys

from offramp_client.client import OfframpClient, OfframpError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offramp-client", description="Talk to an Offramp model served by Triton.")
    p.add_argument("--url", default=None, help="host:port (default localhost:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--model", default="offramp")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "one response with the whole text"), ("stream", "print tokens as they come")):
        s = sub.add_parser(name, help=help_text)
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
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    client = OfframpClient(url, args.protocol, args.model)
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


if __name__ == "__main__":
    sys.exit(main())
