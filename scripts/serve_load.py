#!/usr/bin/env python3
"""A bounded load test of `afm serve` on loopback: CLIENTS concurrent clients send REQUESTS
chat completions in all (the official `openai` client, half of them streamed), and the
script reports errors and the latency p50 / p99.

Usage: python serve_load.py BASE_URL [CLIENTS=8] [REQUESTS=200] [MAX_TOKENS=8]
Prints one JSON line; exits non-zero if any request failed.
"""
import json
import sys
import threading
import time

import openai


def main():
    base = sys.argv[1]
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    total = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    lock = threading.Lock()
    next_i = [0]
    lat, errors = [], []

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            msgs = [{"role": "user", "content": f"Request {i}: name a fruit."}]
            t0 = time.perf_counter()
            try:
                if i % 2:
                    text = "".join(
                        c.choices[0].delta.content or ""
                        for c in client.chat.completions.create(
                            model=model, messages=msgs, max_tokens=max_tokens, stream=True,
                            temperature=0.7, seed=i)
                        if c.choices)
                else:
                    text = client.chat.completions.create(
                        model=model, messages=msgs, max_tokens=max_tokens, temperature=0.7,
                        seed=i).choices[0].message.content
                if not text:
                    raise RuntimeError("empty answer")
                with lock:
                    lat.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 -- every failure is counted and reported
                with lock:
                    errors.append(f"{i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else None

    print(json.dumps({
        "clients": clients, "requests": total, "ok": len(lat), "errors": len(errors),
        "first_errors": errors[:3], "wall_s": round(wall, 2),
        "p50_s": pct(50) and round(pct(50), 3), "p99_s": pct(99) and round(pct(99), 3),
        "requests_per_s": round(len(lat) / wall, 2),
    }))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
