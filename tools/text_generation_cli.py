"""Interactive client of the text generation server (Megatron's CLI).

    python tools/text_generation_cli.py <host:port>

Asks for a prompt and a number of tokens, sends ``PUT http://<host:port>/api`` and prints
``Megatron Response:`` with the text. Ends at end of input (Ctrl-D).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import urllib.error
import urllib.request


def _put(url: str, payload: dict):
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="PUT",
                                     headers={"Content-Type": "application/json; charset=UTF-8"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", errors="replace")
        try:
            return err.code, json.loads(body)
        except json.JSONDecodeError:
            return err.code, {"message": body}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Interactive client of the text generation server: asks for a "
                                                 "prompt and a number of tokens and prints the server's text.")
    parser.add_argument("address", metavar="host:port", help="where tools/run_text_generation_server.py listens")
    return parser


def main(argv=None) -> int:
    url = f"http://{get_parser().parse_args(argv).address}/api"
    while True:
        try:
            sentence = input("Enter prompt: ")
            tokens_to_generate = ast.literal_eval(input("Enter number of tokens to generate: "))
        except EOFError:
            print()
            return 0
        except (ValueError, SyntaxError):
            print("The number of tokens must be an integer")
            continue
        try:
            status, reply = _put(url, {"prompts": [sentence], "tokens_to_generate": tokens_to_generate})
        except urllib.error.URLError as err:
            print(f"Cannot reach {url}: {err.reason}")
            return 1
        if status == 200:
            print(f"Megatron Response: {reply['text'][0]}")
        else:
            print(f"Error {status}: {reply.get('message')}")


if __name__ == "__main__":
    sys.exit(main())
