#!/usr/bin/env python3
"""`afm serve` through the official `openai` Python client (PyPI `openai`).

Usage: python serve_openai_client.py BASE_URL IMAGE [--text-only]
BASE_URL is the server's root (http://127.0.0.1:PORT). Checks models.list, chat completions
streaming and not, with text and (unless --text-only) an image as a data: URL, and that a
request over a limit raises the client's BadRequestError. Prints one JSON line of results;
exits non-zero on the first failure.
"""
import base64
import json
import sys

import openai


def main():
    base, image = sys.argv[1], sys.argv[2]
    text_only = "--text-only" in sys.argv[3:]
    client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=300)
    out = {"openai_version": openai.__version__}

    models = client.models.list()
    model = models.data[0].id
    out["model"] = model

    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert r.object == "chat.completion", r
    assert text and text.strip(), r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens >= 1, r.usage
    out["text"] = text

    # The same request streamed gives the same text (greedy).
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        stream=True,
    ):
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.content:
                pieces.append(d.content)
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text, (pieces, text)
    assert finish in ("stop", "length"), finish
    out["stream_chunks"] = len(pieces)

    # Sampling options: seeded sampling is reproducible.
    def sampled():
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Say something."}],
            max_tokens=10, temperature=0.9, top_p=0.95, seed=5,
        ).choices[0].message.content
    a, b = sampled(), sampled()
    assert a == b, (a, b)

    # A limit: max_tokens above the server's --max-tokens is a 400.
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
        raise AssertionError("max_tokens over the limit was accepted")
    except openai.BadRequestError as e:
        assert "max_tokens" in str(e), e
        out["limit_error"] = str(e)[:120]

    if not text_only:
        with open(image, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        msg = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."}]}]
        r = client.chat.completions.create(model=model, messages=msg, max_tokens=16, temperature=0)
        img_text = r.choices[0].message.content
        assert img_text and len(img_text.split()) >= 2, r
        # image tokens count as prompt tokens
        assert r.usage.prompt_tokens > 30, r.usage
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=model, messages=msg, max_tokens=16, temperature=0, stream=True)
            if c.choices)
        assert streamed == img_text, (streamed, img_text)
        out["image_text"] = img_text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
