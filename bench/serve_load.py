"""Serving load: a bounded load on the HTTP endpoint (throughput, client latency, errors) beside the
same requests answered in-process, one at a time.

Starts the endpoint of a run's controller on an ephemeral localhost port (in this process, one model),
sends ``--n`` requests (image uploads, cycling over the requests file) from ``--concurrency`` client
threads with a timeout each, then answers the same requests through ``Controller.answer`` directly.
Prints requests per second of both and their ratio, p50 / p95 client latency, the status codes and
the errors (none expected). The server answers one request at a time (one model), so concurrency
queues requests: throughput is the model's, and client latency includes the queue.

    python -m bench.serve_load --run runs/MultiKnob-v0/grpo/<timestamp> --requests data/held_out/data.jsonl [--n 200] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from backends.script_args import OneLineArgumentParser, at_least


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder written by train.py")
    parser.add_argument("--requests", required=True, help="a requests file (datasets format)")
    parser.add_argument("--n", type=at_least(1), default=200, help="requests to send (default 200)")
    parser.add_argument("--concurrency", type=at_least(1), default=4, help="client threads (default 4)")
    parser.add_argument("--budget", default=None, help="the requests' budget (default: the run's)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds each request may take")
    args = parser.parse_args()
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be >= 1")

    import httpx
    import uvicorn

    from serving import Controller
    from serving.http import create_app
    from serving.requests import read_requests

    requests = read_requests(args.requests)
    controller = Controller.from_run(args.run, budget=args.budget)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(controller), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:
        time.sleep(0.05)
    payloads = [(png(r.image), r.question, r.question_type) for r in requests]
    budget = f"{controller.budget_ms:g}ms"

    def send(i: int) -> tuple[int | str, float]:
        image, question, qtype = payloads[i % len(payloads)]
        start = time.perf_counter()
        try:
            response = httpx.post(f"{url}/answer", files={"image": ("q.png", image, "image/png")},
                                  data={"question": question, "budget": budget, **({"type": qtype} if qtype else {})},
                                  timeout=args.timeout)
            return response.status_code, time.perf_counter() - start
        except httpx.HTTPError as exc:
            return type(exc).__name__, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(send, range(args.n)))
    http_seconds = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=30)

    start = time.perf_counter()
    for i in range(args.n):
        controller.answer(requests[i % len(requests)])
    direct_seconds = time.perf_counter() - start

    statuses = Counter(status for status, _ in results)
    latencies = [seconds * 1e3 for status, seconds in results if status == 200]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# serve_load: {args.n} requests, {args.concurrency} concurrent, budget {budget}, run {Path(args.run)}")
    print(f"HTTP:       {args.n / http_seconds:.1f} requests/s ({http_seconds:.1f} s), client latency p50 "
          f"{statistics.median(latencies):.1f} ms, p95 {np.percentile(latencies, 95):.1f} ms" if latencies else
          "HTTP:       no successful request")
    print(f"in-process: {args.n / direct_seconds:.1f} requests/s ({direct_seconds:.1f} s), one at a time")
    print(f"ratio HTTP / in-process throughput: {direct_seconds / http_seconds:.2f}")
    print(f"status codes: {dict(statuses)}; errors: {args.n - statuses.get(200, 0)}; load average {load:.1f}")


if __name__ == "__main__":
    main()
