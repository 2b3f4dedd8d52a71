#!/usr/bin/env python3
"""Runs the README's curl examples, in order, against a running kloudmeter and checks them.

    readme-examples.py BASE_URL [README]

- Every ```sh block whose commands call curl on localhost:8080 runs (with that address
  replaced by BASE_URL) as one bash script; its standard output must equal the ```json
  or ```csv block right after it, if there is one. In expected JSON the string "..."
  matches any value. A block that only reads (no -X, no -d) is retried for up to 20 s,
  since readings follow events within about a second.
- Every request body in those blocks must validate against the request schema that the
  server's own /openapi.json gives that method, path and content type.
Exits non-zero at the first example that fails, saying which and why.
"""
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jsonschema_rs  # schemathesis brings it into the tool cache's Python

README_HOST = "localhost:8080"


def blocks(text):
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, re.S | re.M)]


def commands(script):
    """The script's commands, each one whole (continuation lines and quoted newlines joined)."""
    out, current = [], ""
    for line in script.splitlines():
        current = f"{current}\n{line}" if current else line
        if current.endswith("\\"):
            continue
        try:
            words = shlex.split(current, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            out.append(words)
        current = ""
    return out


def json_values(text):
    """The JSON values written one after another in text (curl adds no newline)."""
    dec, values, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        value, i = dec.raw_decode(text, i)
        values.append(value)
        while i < len(text) and text[i].isspace():
            i += 1
    return values


def matches(expected, got):
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return isinstance(got, dict) and expected.keys() == got.keys() and all(matches(v, got[k]) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(got, list) and len(expected) == len(got) and all(matches(a, b) for a, b in zip(expected, got))
    return expected == got and type(expected) is type(got)


def request_of(words):
    """(method, path, content type, body) of a curl command line."""
    method, url, ctype, body = None, None, "application/json", None
    it = iter(words[1:])
    for w in it:
        if w == "-X":
            method = next(it)
        elif w in ("-d", "--data", "--data-raw"):
            body = next(it)
        elif w == "-H":
            name, _, value = next(it).partition(":")
            if name.strip().lower() == "content-type":
                ctype = value.strip()
        elif not w.startswith("-"):
            url = w
    if method is None:
        method = "POST" if body is not None else "GET"
    path = re.sub(r"^(https?://)?[^/]+", "", url or "").split("?")[0]
    return method, path, ctype, body


def pointer(*parts):
    """A URI fragment holding the JSON pointer to parts (`{id}` percent-encoded)."""
    escaped = (p.replace("~", "~0").replace("/", "~1") for p in parts)
    return "#/" + "/".join(urllib.parse.quote(p, safe="~") for p in escaped)


def check_body(doc, method, path, ctype, body):
    """The body against the request schema /openapi.json gives this route."""
    candidates = sorted(
        (t.count("{"), t)
        for t, item in doc["paths"].items()
        if method.lower() in item and re.match("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)) + "$", path)
    )
    if not candidates:
        return f"{method} {path}: no such operation in /openapi.json"
    template = candidates[0][1]  # the most literal template that matches
    content = doc["paths"][template][method.lower()].get("requestBody", {}).get("content", {})
    if ctype not in content:
        return f"{method} {template} documents no {ctype} request body"
    root = dict(doc)
    root["$ref"] = pointer("paths", template, method.lower(), "requestBody", "content", ctype, "schema")
    try:
        jsonschema_rs.Draft202012Validator(root).validate(json.loads(body))
    except jsonschema_rs.ValidationError as e:
        return f"{method} {template}: the README's body does not validate against /openapi.json: {e.message} at {list(e.instance_path)}"
    return None


def run_block(cmds, host):
    """Each command's standard output, in order (the commands run one by one)."""
    outs = []
    for words in cmds:
        words = [w.replace(README_HOST, host) for w in words]
        run = subprocess.run(words, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{shlex.join(words)} exited {run.returncode}: {run.stderr}")
        outs.append(run.stdout)
    return outs


def answered(expected, outs):
    """None when the outputs are what the README shows, else what differs."""
    lang, want = expected
    got = "".join(outs)
    if lang == "csv":
        return None if want.strip().splitlines() == got.strip().splitlines() else "a different answer"
    try:
        values = [v for out in outs for v in json_values(out)]
    except json.JSONDecodeError as e:
        return f"an answer that is not JSON ({e})"
    return None if matches(json_values(want), values) else "a different answer"


def main():
    base = sys.argv[1].rstrip("/")
    readme = sys.argv[2] if len(sys.argv) > 2 else "README.md"
    host = re.sub(r"^https?://", "", base)
    doc = json.load(urllib.request.urlopen(base + "/openapi.json"))
    found = blocks(open(readme, encoding="utf-8").read())
    ran = 0
    for n, (lang, body) in enumerate(found):
        if lang != "sh" or "curl" not in body or README_HOST not in body:
            continue
        cmds = commands(body)
        expected = found[n + 1] if n + 1 < len(found) and found[n + 1][0] in ("json", "csv") else None
        read_only = not re.search(r"(^|\s)(-X|-d)\s", body)
        deadline = time.time() + (20 if read_only and expected else 0)
        while True:
            try:
                outs = run_block(cmds, host)
            except RuntimeError as e:
                sys.exit(f"README example {n} failed: {e}")
            problem = answered(expected, outs) if expected else None
            if problem is None or time.time() > deadline:
                break
            time.sleep(0.5)
        if problem:
            sys.exit(f"README example {n} gave {problem}:\n{body}\n--- README shows:\n{expected[1]}--- the server answered:\n{''.join(outs)}")
        # the server and /openapi.json agree on every body: accepted bodies validate
        # against the schema, refused ones (an error answer) do not
        for words, out in zip(cmds, outs):
            method, path, ctype, payload = request_of(words)
            if payload is None:
                continue
            refused = '"status":"error"' in out
            problem = check_body(doc, method, path, ctype, payload)
            if problem and not refused:
                sys.exit(f"README example {n}: {problem}\n{body}")
            if refused and problem is None:
                sys.exit(f"README example {n}: the server refused a body that /openapi.json accepts ({out}):\n{body}")
        ran += 1
        print(f"ok: README example {n}: {len(cmds)} command(s)" + (", answers as shown" if expected else ""))
    if ran == 0:
        sys.exit("no README example ran")
    print(f"{ran} README examples ran and answered as shown")


if __name__ == "__main__":
    main()
