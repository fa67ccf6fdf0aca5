"""Interactive client for a running server (like the reference's text_generation_cli.py):
asks for a prompt and a number of tokens, sends PUT /api, prints the text. Ctrl-D ends it.
With --chat, a conversation instead: each line is the user's turn, sent with the turns before it
to POST /v1/chat/completions (the model's own chat template where the server has one), and the
answer is the assistant's turn; `/reset` starts a new conversation.

    python launchers/generate_cli.py 127.0.0.1:5000 [--tokens-to-generate 64]
    python launchers/generate_cli.py 127.0.0.1:5000 --chat [--system "You answer briefly."]
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
CHAT_TOKENS = 256  # --chat without --tokens-to-generate: the most an answer may take


def put(
    url: str, body: dict[str, Any], token: str | None, wait_ready: float = 0.0, method: str = "PUT"
) -> tuple[int, dict[str, Any]]:
    """(status, reply) of a `method` request. A 503 from a server still warming up is retried
    (as its Retry-After says) for up to `wait_ready` seconds, with one line on stderr."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline, told = time.monotonic() + wait_ready, False
    while True:
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method=method)
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
    p.add_argument(
        "--chat",
        action="store_true",
        help="a conversation through /v1/chat/completions: each line a user turn, the turns "
        f"before it sent along; answers of up to --tokens-to-generate tokens ({CHAT_TOKENS} "
        "when not given); /reset starts over",
    )
    p.add_argument("--system", help="with --chat: the system message that opens the conversation")
    args = p.parse_args(argv)
    if args.system is not None and not args.chat:
        p.error("--system needs --chat")
    token = args.token or os.environ.get(TOKEN_ENV)
    if args.chat:
        return chat(args, token)
    url = f"http://{args.address}/api"
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


def chat(args: argparse.Namespace, token: str | None) -> int:
    """--chat: the conversation loop; a turn the server refuses is printed and left out."""
    url = f"http://{args.address}/v1/chat/completions"
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    while True:
        line = ask("You: ")
        if line is None:
            return 0
        if line.strip() == "/reset":
            messages = list(opening)
            print("(a new conversation)")
            continue
        body = {
            "messages": [*messages, {"role": "user", "content": line}],
            "max_tokens": args.tokens_to_generate or CHAT_TOKENS,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p or 1.0,  # the chat API's off
        }
        if args.seed >= 0:
            body["seed"] = args.seed
        try:
            status, reply = put(url, body, token, args.wait_ready, method="POST")
        except (urllib.error.URLError, ConnectionError) as e:
            print(f"error: cannot reach {url}: {e}", file=sys.stderr)
            return 1
        if status != 200:
            print(f"Error {status}: {reply.get('error', {}).get('message', reply)}")
            continue
        answer = reply["choices"][0]["message"]["content"]
        messages = [*body["messages"], {"role": "assistant", "content": answer}]
        print(f"Assistant: {answer}")


if __name__ == "__main__":
    sys.exit(main())
