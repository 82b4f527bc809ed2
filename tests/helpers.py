"""Helpers shared by several test modules, importable as `helpers` (setup.cfg's pythonpath puts tests/ on sys.path;
conftest.py has pytest rewrite their asserts). The general ones first, then one section per group of test modules."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIALOGSUM = REPO_ROOT.parent / "shared" / "data" / "dialogsum"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The multi-process backends, as accelerate launch flags; DeepSpeed runs on the CPU with DS_ACCELERATOR=cpu.
BACKENDS = {
    "ddp": ["--multi_gpu", "--mixed_precision", "no"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "no"],
    "zero2-bf16": ["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "no"],
}


# A variant whose code path a default case already covers (e.g. ZeRO-2 in fp32 next to ZeRO-2 in bf16): it runs in
# `make test-extended`, not in `make test`, to keep the default suite short.
EXTENDED = pytest.mark.extended


def backend_params(*extended: str) -> list:
    """BACKENDS as parameters; the named backends run only in `make test-extended`."""
    return [pytest.param(b, marks=EXTENDED) if b in extended else b for b in BACKENDS]


def launcher(backend: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
            *BACKENDS[backend], "--num_processes", str(processes), "--main_process_port", str(free_port())]


def copy_checkpoint(run: Path, stage: str, step: int, into: Path) -> None:
    """Start `into` from `run`'s checkpoint of `step`, as if a run there had been killed right after writing it."""
    target = into / stage / "checkpoints" / f"checkpoint-{step}"
    shutil.copytree(run / stage / "checkpoints" / f"checkpoint-{step}", target)


def logged_numbers(record: dict) -> dict:
    """The values of a log.jsonl record that the trackers get: its numbers, without the step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def expected_scalars(records: list[dict]) -> dict[str, list]:
    """What TensorBoard should hold after logging `records` (log.jsonl): {tag: [(step, value), ...]}, float32-close."""
    import pytest

    expected: dict[str, list] = {}
    for record in records:
        for key, value in logged_numbers(record).items():
            expected.setdefault(key, []).append((record["step"], pytest.approx(value, rel=1e-6, abs=1e-12)))
    return expected


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under a TensorBoard log directory, as (step, value) in step order, after TensorBoard's own
    purging of the steps a resumed run logged again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The history rows ({"_step": step, key: value}) of the one offline run under `wandb_dir` (wandb.init's
    dir/wandb), read from its transaction log run-<id>.wandb: a LevelDB-style log of wandb_internal Record messages
    after a 7-byte ":W&B" header, in 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    data, block, position, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while position + 7 <= len(data):
        left = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length, kind) == (0, 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


# ----------------------------------------------------------------------------------------------------
# Training runs on the tiny artifacts (tests/train, tests/eval)


def sft_args(repo_root: Path, tiny, out: Path, *extra: str) -> list[str]:
    """Small, fast settings on the tiny artifacts (absolute paths, so any working directory works)."""
    return [
        "--config", str(repo_root / "configs/tiny.yaml"), "--output_dir", str(out),
        "--data.path", str(tiny.dialogsum), "--model.name_or_path", str(tiny.t5),
        "--data.max_examples", "64", "--sft.batch_size", "8", "--sft.learning_rate", "1e-2",
        "--sft.eval_rouge_examples", "4", "--eval.generation.max_new_tokens", "8", "--sft.log_every_steps", "5",
        "--sft.max_steps", "null", "--sft.lr_scheduler", "linear",  # epoch-based unless a test says otherwise
        "--lora.target_modules", "q,v", "--lora.r", "8", "--lora.alpha", "8",  # what these tests were sized for
        *extra,
    ]


# ----------------------------------------------------------------------------------------------------
# PPO runs as subprocesses on the tiny default (tests/train/test_ppo.py, test_resume.py)

PPO_TIMEOUT_S = 300
# Fast tiny settings shared by the PPO subprocess runs: short prompts, small batches, no periodic checkpoints.
# The tests were sized for LoRA r=8 on q,v (a test may widen the targets); the recipe's own LoRA can change.
FAST_LORA = ["--lora.target_modules", "q,v", "--lora.r", "8", "--lora.alpha", "8"]
FAST = ["--data.max_prompt_tokens", "64", "--ppo.save_every_steps", "100", *FAST_LORA]


def ppo_args(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"),
        "--output_dir", str(out),
        "--data.path", str(tiny.dialogsum),
        "--model.name_or_path", str(tiny.t5),
        "--reward.model_name_or_path", str(tiny.roberta),
        *FAST, *extra,
    ]


def ppo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_ppo(args: list[str], launcher: list[str] | None = None, env: dict | None = None, timeout: int = PPO_TIMEOUT_S):
    command = (launcher or [sys.executable]) + ["-m", "train.ppo", *args]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env or ppo_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def read_ppo_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ppo" / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# FLAN-T5 checkpoints (tests/train/test_models.py, test_param_report.py)


# Published parameter counts of the google/flan-t5-* checkpoints (untied LM head).
CHECKPOINT_PARAMS = {
    "google/flan-t5-small": 76_961_152,
    "google/flan-t5-base": 247_577_856,
    "google/flan-t5-large": 783_150_080,
    "google/flan-t5-xl": 2_849_757_184,
    "google/flan-t5-xxl": 11_135_332_352,
}


# ----------------------------------------------------------------------------------------------------
# ppo_step on the tiny T5 (tests/train/test_ppo.py, tests/train/test_rollout.py)


def tiny_ppo_policy(tiny_artifacts, **ppo):
    """The tiny T5 policy with a non-zero LoRA adapter, its tokenizer and its PPO settings."""
    import torch

    from train.config import load_config
    from train.models import load_policy

    overrides = ["--model.name_or_path", str(tiny_artifacts.t5)]
    for key, value in ppo.items():
        overrides += [f"--ppo.{key}", str(value)]
    cfg = load_config(None, overrides + ["--model.dtype", "float32", "--lora.r", "8", "--lora.alpha", "8"])
    torch.manual_seed(0)
    policy, tokenizer = load_policy(cfg)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from its reference
        for name, param in policy.peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return policy, tokenizer, cfg.ppo


def generated_rollout(policy, tokenizer, rows: int) -> dict:
    """Sampled responses to `rows` prompts, with scores: the ids a rollout produces, before its forward passes."""
    import torch

    from train.ppo_core import response_mask_from_ids

    prompts = [f"#Person1#: hello number {i}. #Person2#: hi, how are you?" for i in range(rows)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(1)
    with torch.no_grad():
        response_ids = policy.generate(
            input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True, max_new_tokens=12
        )
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    scores = torch.linspace(-1.0, 1.0, rows)
    return dict(query_ids=enc.input_ids, query_mask=enc.attention_mask, response_ids=response_ids,
                response_mask=response_mask, scores=scores)


def rollout_trajectory(policy, rollout: dict, cfg, chunk_size: int = 4, accelerator=None):
    """The `Trajectory` of `rollout`: the forward passes a PPO step starts from."""
    from train.rollout import forward_trajectory

    return forward_trajectory(policy, **rollout, chunk_size=chunk_size, trl_first_token_mask=cfg.trl_first_token_mask,
                              accelerator=accelerator)


# ----------------------------------------------------------------------------------------------------
# Evaluation runs of eval.evaluate on the tiny models (tests/eval)


EVAL_EXAMPLES = 7  # odd, and 4 batches of 2: the 2 processes get 4 and 3 examples
EVAL_RUN_ARGS = [
    "--config", "configs/tiny.yaml", "--eval.max_examples", str(EVAL_EXAMPLES),
    "--eval.generation.batch_size", "2", "--eval.generation.max_new_tokens", "12",
    "--eval.bootstrap_samples", "300", "--eval.torch_threads", "1", "--eval.qualitative_rows", "2",
    "--eval.samples_per_prompt", "3", "--rollout.max_new_tokens", "12",
]
EVAL_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def read_eval_examples(out_dir: Path) -> list[dict]:
    """The records of <out_dir>/eval/examples.jsonl."""
    return [json.loads(line) for line in (out_dir / "eval" / "examples.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# The human evaluation app, in process (tests/eval/human)


def write_eval_examples(path: Path, n: int, systems: list[str]) -> Path:
    """A small examples.jsonl in eval.evaluate's format; each summary names its example and system."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "examples.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"test_{i}",
                "dialogue": f"#Person1#: Hello number {i}.\n#Person2#: Hi, how are you?",
                "human_summaries": [f"Two people greet each other ({i})."],
                "systems": {s: {"summary": f"Summary {i} written by model {k}.", "reward": 0.5, "toxicity": 0.1,
                                "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2}
                            for k, s in enumerate(systems)},
            }) + "\n")
    return path


def next_item_id(client) -> str | None:
    response = client.get("/next")
    if response.status_code == 200:
        assert "All done" in response.text
        return None
    assert response.status_code == 303
    return response.headers["location"].removeprefix("/item/")


def count_rows(db: Path, table: str) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


# ----------------------------------------------------------------------------------------------------
# The reward server as a subprocess (tests/rewards)


REWARD_TOKEN = "test-token-123"
REWARD_MAX_TEXTS, REWARD_MAX_CHARS = 16, 400
REWARD_SERVER_STARTUP_S = 60


class RewardServerProcess:
    """`python -m rewards.server` serving the classifier `model` on the CPU, on a free port of 127.0.0.1."""

    def __init__(self, model: Path, *extra: str, token: str | None = REWARD_TOKEN) -> None:
        self.port, self.token = free_port(), token
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "DETOX_REWARD_TOKEN"}
        if token:
            env["DETOX_REWARD_TOKEN"] = token
        command = [sys.executable, "-m", "rewards.server", *extra, "--reward.model_name_or_path", str(model),
                   "--reward.device", "cpu", "--reward_server.port", str(self.port), "--reward_server.log_level", "warning"]
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx
        import pytest

        deadline = time.monotonic() + REWARD_SERVER_STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"reward server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"reward server did not answer /health within {REWARD_SERVER_STARTUP_S} s")

    def stats(self) -> dict:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.get(f"{self.url}/stats", headers=headers, timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def texts_for(worker: int, request: int) -> list[str]:
    """Different texts (and different counts) for every request, half of them hateful in the tiny classifier's terms."""
    base = ["#Person1# thanks #Person2# for the kind help.", "You are a stupid lazy coward, I hate you.",
            "What a helpful host you are.", "What an incompetent moron you are."]
    return [f"{base[(worker + i) % 4]} ({worker}-{request}-{i})" for i in range(1 + (worker + request) % 4)]


def assert_same_scores(actual, expected) -> None:
    """Two `RewardScores` agree to 1e-5."""
    import torch

    torch.testing.assert_close(actual.rewards, expected.rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.toxicity, expected.toxicity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Benchmark scripts (tests/bench)


BENCH_TIMEOUT_S = 600


def run_bench_script(repo_root, *args: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS...` from the repository root, one thread; it must succeed."""
    proc = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------------------------------
# ASGI requests whose bodies arrive as the test says (tests/rewards/test_server.py, tests/eval/human/test_app.py)


def replaying_receive(parts: list):
    """An ASGI `receive` that hands out `parts` (bytes) in order; "stall" means nothing more ever comes and "gone"
    that the client hangs up."""
    import asyncio

    pending = list(parts)

    async def receive() -> dict:
        if not pending or pending[0] == "stall":
            await asyncio.Event().wait()
        part = pending.pop(0)
        if part == "gone":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": part, "more_body": bool(pending)}

    return receive


# ----------------------------------------------------------------------------------------------------
# Tiny random classifiers (reward and judge tests)

WORDS = "you are a kind friend lazy stupid coward thank for the help I hate nice day idiot".split()


def build_tiny_classifier(out_dir, id2label: dict[int, str], max_positions: int = 34, sentinel_max_length=True):
    """A random RoBERTa classifier + word-level tokenizer saved to out_dir (labels in the order given)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(w.lower() for w in WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=["input_ids", "attention_mask"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        # The huge "unknown limit" value some hub tokenizers carry; the model's positions must win.
        model_max_length=int(1e30) if sentinel_max_length else max_positions - 2,
    )
    assert len(tokenizer) == len(vocab)
    config = RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config)
    # Larger weights in the head so the two logits clearly differ on a random model.
    torch.nn.init.normal_(model.classifier.out_proj.weight, std=2.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
