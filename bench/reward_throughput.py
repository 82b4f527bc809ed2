"""Reward scoring throughput: in-process scorer vs the reward server (one client, and N concurrent clients).

    python bench/reward_throughput.py [--model artifacts/tiny/roberta-hate] [--device auto]
        [--batch-sizes 8,32,128] [--texts 1024] [--clients 8] [--append bench/RESULTS.md]

"Batch size" is the number of texts per scorer call in-process and per HTTP request to the server. The server is
started once as a subprocess (`python -m rewards.server`, reward.batch_size = the largest batch size) so that with
concurrent clients its dynamic batching can merge small requests. Prints a Markdown table; --append also writes it
with the machine, versions, date and command into a results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from statistics import median
from pathlib import Path

import httpx
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from rewards.client import RewardClient  # noqa: E402
from rewards.config import RewardConfig  # noqa: E402
from rewards.scorer import RewardScorer  # noqa: E402
from machine import machine_line, versions_line  # bench/machine.py

RESULTS_HEADER = "# Benchmark results\n\nBenchmark results. Every figure names the command that produced it, the machine and the date.\n"


def bench_texts(n: int, toxicity_dir: Path) -> list[str]:
    """n texts of varied length: the tiny toxicity sentences, some joined to dialogue-summary length."""
    sentences = []
    for name in ("train.jsonl", "test.jsonl"):
        path = toxicity_dir / name
        if path.is_file():
            sentences += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    if not sentences:
        sentences = ["You are a kind friend.", "What an incompetent moron you are.", "Thank you for the help."]
    return [" ".join(sentences[(i + k) % len(sentences)] for k in range(1 + i % 4)) for i in range(n)]


def chunks(texts: list[str], size: int) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def in_process(scorer: RewardScorer, texts: list[str], batch_size: int) -> float:
    scorer.batch_size = batch_size
    scorer.score(texts[:batch_size])  # warm-up
    started = time.perf_counter()
    for chunk in chunks(texts, batch_size):
        scorer.score(chunk)
    return rate(len(texts), time.perf_counter() - started)


def server_clients(url: str, texts: list[str], batch_size: int, clients: int) -> float:
    requests = chunks(texts, batch_size)
    shares = [requests[i::clients] for i in range(clients)]
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def work(share: list[list[str]]) -> None:
        try:
            with RewardClient(url, max_texts_per_request=batch_size) as client:
                client.score(share[0] if share else ["warm-up"])
                barrier.wait()
                for request in share:
                    client.score(request)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return rate(len(texts), time.perf_counter() - started)


class Server:
    def __init__(self, model: str, device: str, max_batch_size: int, max_wait_ms: float, torch_threads: int | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "DETOX_REWARD_TOKEN"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards.server", "--reward.model_name_or_path", model, "--reward.device", device,
             "--reward_server.port", str(port), "--reward.batch_size", str(max_batch_size),
             "--reward_server.max_wait_ms", str(max_wait_ms), "--reward_server.max_texts_per_request", str(max_batch_size),
             "--reward_server.log_level", "warning",
             *(["--reward_server.torch_threads", str(torch_threads)] if torch_threads else [])],
            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"reward server failed to start: {self.proc.stderr.read().strip()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise SystemExit("reward server did not become ready within 120 s")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/tiny/roberta-hate")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", default="8,32,128")
    parser.add_argument("--texts", type=int, default=1024, help="texts scored per measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the second server column")
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the median of this many runs")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--torch-threads", type=int, default=None, help="CPU threads for the model, here and in the server")
    parser.add_argument("--append", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_dir = (REPO_ROOT / args.model) if not Path(args.model).is_absolute() and (REPO_ROOT / args.model).exists() else Path(args.model)

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    scorer = RewardScorer.from_config(RewardConfig(model_name_or_path=str(model_dir), device=args.device))
    texts = bench_texts(args.texts, REPO_ROOT / "artifacts" / "tiny" / "toxicity")
    server = Server(str(model_dir), str(scorer.device), max(batch_sizes), args.max_wait_ms, args.torch_threads)
    rows = []
    try:
        for batch_size in batch_sizes:
            local = median(in_process(scorer, texts, batch_size) for _ in range(args.repeats))
            one = median(server_clients(server.url, texts, batch_size, 1) for _ in range(args.repeats))
            before = server.stats()
            many = median(server_clients(server.url, texts, batch_size, args.clients) for _ in range(args.repeats))
            after = server.stats()
            texts_per_batch = (after["texts"] - before["texts"]) / max(1, after["batches"] - before["batches"])
            rows.append(f"| {batch_size} | {local:,.0f} | {one:,.0f} | {many:,.0f} | {texts_per_batch:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        server.stop()

    table = "\n".join([
        f"| batch size | in-process texts/s | server, 1 client texts/s | server, {args.clients} clients texts/s "
        f"| server texts per model call ({args.clients} clients) |",
        "|---:|---:|---:|---:|---:|",
        *rows,
    ])
    command = "python bench/reward_throughput.py" + ("" if not (argv or sys.argv[1:]) else " " + shlex.join(argv or sys.argv[1:]))
    section = "\n".join([
        f"## Reward throughput ({model_dir.name} on {scorer.device})",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine_line(f'torch threads {torch.get_num_threads()}')}",
        f"- Versions: {versions_line(('torch', 'transformers', 'fastapi', 'uvicorn', 'httpx'))}",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- {len(texts)} texts per measurement, median of {args.repeats}; server --reward.batch_size {max(batch_sizes)} --reward_server.max_wait_ms {args.max_wait_ms}",
        "",
        table,
        "",
    ])
    print(section)
    if args.append:
        path = args.append if args.append.is_absolute() else Path.cwd() / args.append
        existing = path.read_text() if path.exists() else RESULTS_HEADER
        path.write_text(existing.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    main()
