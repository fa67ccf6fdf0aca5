"""Interactive client for a running server (like the reference's text_generation_cli.py):
asks for a prompt and a number of tokens, sends PUT /api, prints the text. Ctrl-D ends it.

    python launchers/generate_cli.py 127.0.0.1:5000 [--tokens-to-generate 64]
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

TOKEN_ENV = "TOOLKIT_SERVE_TOKEN"


def put(
    url: str, body: dict[str, Any], token: str | None, wait_ready: float = 0.0
) -> tuple[int, dict[str, Any]]:
    """(status, reply). A 503 from a server still warming up is retried (as its Retry-After
    says) for up to `wait_ready` seconds, with one line on stderr."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline, told = time.monotonic() + wait_ready, False
    while True:
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="PUT")
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as e:
            status, reply, retry = e.code, json.load(e), e.headers.get("Retry-After", "1")
        if status != 503 or time.monotonic() > deadline:
            return status, reply
        if not told:
            print("the server is starting (warming up): waiting for it", file=sys.stderr)
            told = True
        time.sleep(float(retry) if retry.isdigit() else 1.0)


def ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python launchers/generate_cli.py", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("address", help="HOST:PORT of launchers/serve.py")
    p.add_argument("--tokens-to-generate", type=int, help="ask for each prompt when not given")
    p.add_argument("--temperature", type=float, default=1.0, help="in (0, 100]")
    p.add_argument("--top-k", type=int, default=0, help="1 is greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=-1, help="-1: a new one per request")
    p.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument(
        "--wait-ready",
        type=float,
        default=600.0,
        help="seconds to wait for a server that is still starting (503) before giving up",
    )
    args = p.parse_args(argv)
    url = f"http://{args.address}/api"
    token = args.token or os.environ.get(TOKEN_ENV)
    while True:
        sentence = ask("Enter prompt: ")
        if sentence is None:
            return 0
        n = args.tokens_to_generate
        while n is None:
            answer = ask("Enter number of tokens to generate: ")
            if answer is None:
                return 0
            try:
                n = int(answer)
            except ValueError:
                print(f"not a whole number: {answer!r}")
        body = {
            "prompts": [sentence],
            "tokens_to_generate": n,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "random_seed": args.seed,
        }
        try:
            status, reply = put(url, body, token, args.wait_ready)
        except (urllib.error.URLError, ConnectionError) as e:
            print(f"error: cannot reach {url}: {e}", file=sys.stderr)
            return 1
        if status != 200:
            print(f"Error {status}: {reply.get('message', reply)}")
        else:
            print("Response:")
            print(reply["text"][0])


if __name__ == "__main__":
    sys.exit(main())
