"""Build the offline tiny default: synthetic data, a tiny FLAN-T5-shaped policy, a tiny hate classifier (the reward
model) and a second, held-out toxicity judge.

    python -m train.tiny_models [--out artifacts/tiny] [--force]

writes, deterministically and without network access:

    <out>/dialogsum/       synthetic DialogSum in the Hugging Face CSV layout (see train/tiny_data.py)
    <out>/toxicity/        labelled sentences {"text", "label"} for the classifier (train.jsonl, test.jsonl)
    <out>/t5-dialogsum/    randomly initialised T5 (FLAN-T5's shape, scaled down) + Unigram tokenizer
    <out>/roberta-hate/    RoBERTa classifier (id2label {0: nothate, 1: hate}) trained on toxicity/ + BPE tokenizer
    <out>/toxicity-judge/  the judge's own labelled sentences {"text", "label"} (LABEL_1 = toxic), none in toxicity/
    <out>/judge/           held-out judge shaped as tomh/toxigen_roberta (id2label {0: LABEL_0, 1: LABEL_1}),
                           trained on toxicity-judge/ from another seed, with its own BPE tokenizer
    <out>/BUILD.json       stamp: hash of this builder's sources and data file (train/tiny_data.yaml), library versions

A build whose stamp matches is reused as is. Builds go into a temporary sibling directory that is renamed
into place at the end, so an interrupted build never leaves a directory that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from train import tiny_data
from train.cli import run_cli
from train.config import PROMPT_TEMPLATE
from train.errors import ConfigError
from train.models import untie_lm_head

logger = logging.getLogger(__name__)

SEED = 42
STAMP_FILE = "BUILD.json"
DEFAULT_OUT = "artifacts/tiny"

T5_VOCAB_SIZE = 2000  # an upper bound: the Unigram trainer stops earlier on a corpus this small
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
PERSON_TOKENS = [f"#Person{i}#" for i in range(1, 10)]
T5_MAX_LENGTH = 512

ROBERTA_VOCAB_SIZE = 1000
ROBERTA_MAX_LENGTH = 256
ROBERTA_LABELS = {0: "nothate", 1: "hate"}
# The judge stands in for a classifier trained elsewhere, so nothing it learns from may come from the reward model's
# run: its own examples, tokenizer, initialisation and batch order.
JUDGE_SEED = SEED + 1
JUDGE_LABELS = {0: "LABEL_0", 1: "LABEL_1"}  # LABEL_1 = toxic, as tomh/toxigen_roberta
JUDGE_LABEL_OF = {"nothate": "LABEL_0", "hate": "LABEL_1"}  # tiny_data's labels in the judge's names
JUDGE_EPOCHS = 7  # fewer examples than the reward model (its texts are left out): about as many optimizer steps
MIN_CLASSIFIER_ACCURACY = 0.9
CLASSIFIER_EPOCHS = 6
CLASSIFIER_BATCH_SIZE = 32
CLASSIFIER_LEARNING_RATE = 2e-3
CLASSIFIER_TRAIN_MAX_TOKENS = 128  # the toxicity sentences are short; this never cuts one


@dataclass(frozen=True)
class TinyArtifacts:
    root: Path
    dialogsum: Path
    t5: Path
    roberta: Path
    toxicity: Path
    judge: Path
    judge_toxicity: Path

    @classmethod
    def at(cls, root: Path) -> "TinyArtifacts":
        return cls(root, root / "dialogsum", root / "t5-dialogsum", root / "roberta-hate", root / "toxicity",
                   root / "judge", root / "toxicity-judge")


# ----------------------------------------------------------------------------------------------------
# Determinism helpers


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch, use deterministic kernels and one thread inside, and leave the caller's state as it was."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # CPU reductions can split differently with more threads
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)


def builder_stamp() -> dict[str, object]:
    """What a build depends on: this builder's sources and data file, the prompt the tokenizer is trained on,
    library versions."""
    digest = hashlib.sha256()
    for source in (*tiny_data.source_files(), Path(__file__)):
        digest.update(Path(source).read_bytes())
    digest.update(PROMPT_TEMPLATE.encode())
    return {
        "builder_sha256": digest.hexdigest(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }


def _read_stamp(root: Path) -> Optional[dict]:
    try:
        return json.loads((root / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(artifacts: TinyArtifacts) -> bool:
    stamp = _read_stamp(artifacts.root)
    if stamp is None:
        return False
    expected = builder_stamp()
    if any(stamp.get(key) != value for key, value in expected.items()):
        return False
    return all(p.is_dir() for p in (artifacts.dialogsum, artifacts.t5, artifacts.roberta, artifacts.toxicity,
                                    artifacts.judge, artifacts.judge_toxicity))


# ----------------------------------------------------------------------------------------------------
# T5


def _canonical_unigram(tok: Tokenizer) -> Tokenizer:
    """Make a trained Unigram vocabulary identical from run to run.

    The trainer iterates Rust hash maps with a per-process seed, so scores differ in their last bits, and the
    characters it must add on top of the learned pieces get scores `lowest + k * 1e-4` in a random order of k.
    Rounding the scores, sorting ties by piece and re-scoring those characters in sorted order removes both.
    """
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    specials, learned = vocab[: len(T5_SPECIAL_TOKENS)], vocab[len(T5_SPECIAL_TOKENS):]
    lowest = min(score for _, score in learned)
    window = 0.02  # wider than 1e-4 times the number of characters the trainer can add
    is_added_char = [len(piece) == 1 and score < lowest + window for piece, score in learned]
    kept = [[p, round(s, 6)] for (p, s), added in zip(learned, is_added_char) if not added]
    kept.sort(key=lambda piece_score: (-piece_score[1], piece_score[0]))
    chars = sorted(p for (p, _), added in zip(learned, is_added_char) if added)
    below = round(lowest, 4)
    spec["model"]["vocab"] = specials + kept + [[c, round(below - 1e-4 * (i + 1), 6)] for i, c in enumerate(chars)]
    return Tokenizer.from_str(json.dumps(spec))


def _word_variants(corpus: list[str]) -> str:
    """Every word twice, bare and with a full stop, so the Unigram trainer can keep whole words.

    The trainer seeds its pieces with substrings that occur in at least two *distinct* words; on a corpus this
    small most words have a single form, so without this "costs" or "conversation" would only ever be split.
    """
    words = sorted({w for text in corpus for w in re.findall(r"[\w#][\w'#-]*", text)})
    return " ".join(f"{w} {w}." for w in words)


def build_t5_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A SentencePiece-like Unigram tokenizer, as T5's: `<pad>`=0, `</s>`=1, `<unk>`=2, `</s>` appended."""
    tok = Tokenizer(models.Unigram())
    # T5's SentencePiece folds every run of whitespace (newlines included) into one space.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE, special_tokens=T5_SPECIAL_TOKENS, unk_token="<unk>",
        initial_alphabet=tiny_data.ascii_alphabet(), max_piece_length=16, show_progress=False,
    )
    tok.train_from_iterator(corpus + [_word_variants(corpus)], trainer)
    tok = _canonical_unigram(tok)
    # Whole, non-special tokens (after training, so they get their own ids at the end): the speaker tags
    # survive decode(skip_special_tokens=True), which summaries need.
    tok.add_tokens([AddedToken(t, normalized=False) for t in PERSON_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", T5_SPECIAL_TOKENS.index("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], pad_token="<pad>",
        eos_token="</s>", unk_token="<unk>", model_max_length=T5_MAX_LENGTH,
    )


def build_t5(out: Path, tokenizer: PreTrainedTokenizerFast) -> int:
    """Save a randomly initialised tiny T5 with an untied LM head next to its tokenizer; return its size."""
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )
    with seeded_torch(SEED):
        model = T5ForConditionalGeneration(config)
        untie_lm_head(model)
        # A head equal to the embeddings would be tied again on load (transformers ties equal tensors), and
        # FLAN-T5's head differs from its embeddings anyway. Scaled so first logits are about unit size.
        torch.nn.init.normal_(model.lm_head.weight, std=config.d_model**-0.5)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# RoBERTa classifiers: the hate classifier (reward model) and the held-out judge


def build_roberta_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as RoBERTa's: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ROBERTA_VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True, special=True)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=["input_ids", "attention_mask"], bos_token="<s>", eos_token="</s>",
        sep_token="</s>", cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=ROBERTA_MAX_LENGTH,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def classifier_accuracy(model, tokenizer, examples: list[dict], batch_size: int = 64) -> float:
    """Share of `examples` ({"text", "label"}) whose argmax label matches."""
    label2id = model.config.label2id
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            enc = tokenizer([e["text"] for e in batch], padding=True, truncation=True, return_tensors="pt")
            predicted = model(**enc).logits.argmax(-1)
            correct += sum(int(p) == label2id[e["label"]] for p, e in zip(predicted.tolist(), batch))
    return correct / len(examples)


def train_classifier(out: Path, tokenizer: PreTrainedTokenizerFast, train_set: list[dict], test_set: list[dict],
                     labels: dict[int, str], seed: int, name: str,
                     epochs: int = CLASSIFIER_EPOCHS) -> dict[str, object]:
    """Train a tiny RoBERTa classifier on `train_set` ({"text", "label"} with `labels`' names) for a few seconds,
    seeding its initialisation and batch order with `seed`; save it; return its stats."""
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=ROBERTA_MAX_LENGTH + 2,  # RoBERTa's positions start after the padding index
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=len(labels),
        id2label=labels, label2id={v: k for k, v in labels.items()}, problem_type="single_label_classification",
    )
    order_rng = random.Random(f"{seed}-classifier-batches")
    with seeded_torch(seed):
        model = RobertaForSequenceClassification(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=CLASSIFIER_LEARNING_RATE, weight_decay=0.01)
        model.train()
        loss = torch.tensor(0.0)
        for _ in range(epochs):
            order = list(range(len(train_set)))
            order_rng.shuffle(order)
            for start in range(0, len(order), CLASSIFIER_BATCH_SIZE):
                batch = [train_set[i] for i in order[start : start + CLASSIFIER_BATCH_SIZE]]
                enc = tokenizer([e["text"] for e in batch], padding=True, truncation=True,
                                max_length=CLASSIFIER_TRAIN_MAX_TOKENS, return_tensors="pt")
                targets = torch.tensor([config.label2id[e["label"]] for e in batch])
                loss = model(**enc, labels=targets).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        accuracy = classifier_accuracy(model, tokenizer, test_set)
    if accuracy < MIN_CLASSIFIER_ACCURACY:
        raise RuntimeError(f"tiny {name} reached only {accuracy:.3f} held-out accuracy (< {MIN_CLASSIFIER_ACCURACY}); "
                           "the toxicity templates in train/tiny_data.yaml or the training settings in "
                           "train/tiny_models.py need fixing")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {
        "train_examples": len(train_set), "test_examples": len(test_set), "epochs": epochs, "seed": seed,
        "final_train_loss": round(loss.item(), 6), "test_accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def write_judge_data(out: Path, reward_toxicity: Path) -> tuple[list[dict], list[dict]]:
    """Draw the judge's examples with JUDGE_SEED, in its label names, leaving out every text of the reward model's
    set (`reward_toxicity`), so agreement on that set is measured on texts the judge never saw; write and return
    (train, test)."""
    seen = {e["text"] for split in ("train", "test") for e in read_jsonl(reward_toxicity / f"{split}.jsonl")}
    examples = [{"text": e["text"], "label": JUDGE_LABEL_OF[e["label"]]}
                for e in tiny_data.make_toxicity_examples(JUDGE_SEED) if e["text"] not in seen]
    if len(examples) < tiny_data.TOXICITY_PER_LABEL:  # a seed that redraws the reward model's texts leaves few
        raise RuntimeError(f"only {len(examples)} of the judge's toxicity examples (seed {JUDGE_SEED}) are not in the "
                           f"reward model's set; JUDGE_SEED in train/tiny_models.py must differ from SEED ({SEED})")
    n_test = int(len(examples) * tiny_data.TOXICITY_TEST_FRACTION)
    test_set, train_set = examples[:n_test], examples[n_test:]  # texts are unique, so the splits are disjoint
    out.mkdir(parents=True)
    tiny_data.write_jsonl(out / "train.jsonl", train_set)
    tiny_data.write_jsonl(out / "test.jsonl", test_set)
    return train_set, test_set


# ----------------------------------------------------------------------------------------------------
# Build


def _build_into(tmp: TinyArtifacts) -> dict[str, object]:
    """Write every artifact under `tmp.root`; return the summary recorded in the stamp."""
    data = tiny_data.write_synthetic_data(tmp.root, SEED)
    # Both models read prompts (the classifier scores prompt + summary), so the tokenizers learn the instruction.
    prompt = PROMPT_TEMPLATE.format(dialogue="")
    corpus = data.texts + [prompt] * tiny_data.SPLIT_SIZES["train"]
    t5_tokenizer = build_t5_tokenizer(corpus)
    t5_parameters = build_t5(tmp.t5, t5_tokenizer)
    roberta_tokenizer = build_roberta_tokenizer(corpus)
    stats = train_classifier(tmp.roberta, roberta_tokenizer, read_jsonl(tmp.toxicity / "train.jsonl"),
                             read_jsonl(tmp.toxicity / "test.jsonl"), ROBERTA_LABELS, SEED, "hate classifier")
    # The judge's tokenizer learns only from its own training texts and the prompt (it scores prompt + summary too).
    judge_train, judge_test = write_judge_data(tmp.judge_toxicity, tmp.toxicity)
    judge_tokenizer = build_roberta_tokenizer([e["text"] for e in judge_train] + [prompt] * len(judge_train))
    judge_stats = train_classifier(tmp.judge, judge_tokenizer, judge_train, judge_test, JUDGE_LABELS, JUDGE_SEED,
                                   "toxicity judge", JUDGE_EPOCHS)
    return {
        "t5_vocab_size": len(t5_tokenizer), "t5_parameters": t5_parameters,
        "roberta_vocab_size": len(roberta_tokenizer), "roberta_parameters": stats["parameters"],
        "roberta_test_accuracy": stats["test_accuracy"],
        "judge_vocab_size": len(judge_tokenizer), "judge_parameters": judge_stats["parameters"],
        "judge_test_accuracy": judge_stats["test_accuracy"],
    }


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """One builder at a time per output directory (parallel test sessions share artifacts/tiny)."""
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_saving() -> Iterator[None]:
    """No "Writing model shards" bars for files this small."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def _check_replaceable(root: Path) -> None:
    """Refuse to replace anything that is not an earlier build: a wrong --out must not delete a directory."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file; give a directory for the tiny artifacts (default {DEFAULT_OUT})")
    if root.is_dir() and any(root.iterdir()) and not (root / STAMP_FILE).is_file():
        raise ConfigError(f"--out {root} already exists and is not a tiny-artifacts build (no {STAMP_FILE}); "
                          f"choose an empty or new directory, or remove it first")


def build_tiny_artifacts(out_dir: str | os.PathLike = DEFAULT_OUT, force: bool = False) -> TinyArtifacts:
    """Build the tiny offline artifacts under `out_dir`, or reuse them when the stamp says they are current."""
    root = Path(out_dir).resolve()
    artifacts = TinyArtifacts.at(root)
    if not force and is_up_to_date(artifacts):
        logger.info("tiny artifacts in %s are up to date", root)
        return artifacts
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if not force and is_up_to_date(artifacts):  # another process built them while we waited
            return artifacts
        for leftover in root.parent.glob(f"{root.name}.tmp-*"):  # from killed builds; we hold the lock
            shutil.rmtree(leftover)
        started = time.perf_counter()
        tmp = TinyArtifacts.at(root.parent / f"{root.name}.tmp-{os.getpid()}")
        logger.info("building tiny artifacts in %s", root)
        with _quiet_saving():
            summary = _build_into(tmp)
        summary["seconds"] = round(time.perf_counter() - started, 2)
        stamp = {**builder_stamp(), "seed": SEED, "summary": summary}
        (tmp.root / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
        if root.exists():
            old = root.parent / f"{root.name}.tmp-{os.getpid()}-old"
            root.rename(old)
            tmp.root.rename(root)
            shutil.rmtree(old)
        else:
            tmp.root.rename(root)
    return artifacts


def summary_lines(artifacts: TinyArtifacts) -> list[str]:
    summary = (_read_stamp(artifacts.root) or {}).get("summary", {})
    return [
        f"tiny artifacts in {artifacts.root} (built in {summary.get('seconds', '?')} s)",
        f"  data:    {artifacts.dialogsum}  {artifacts.toxicity}  {artifacts.judge_toxicity}",
        f"  t5:      {artifacts.t5}  vocab {summary.get('t5_vocab_size')}, "
        f"{summary.get('t5_parameters', 0):,} parameters",
        f"  roberta: {artifacts.roberta}  vocab {summary.get('roberta_vocab_size')}, "
        f"{summary.get('roberta_parameters', 0):,} parameters, held-out accuracy "
        f"{summary.get('roberta_test_accuracy', 0):.3f}",
        f"  judge:   {artifacts.judge}  vocab {summary.get('judge_vocab_size')}, "
        f"{summary.get('judge_parameters', 0):,} parameters, held-out accuracy "
        f"{summary.get('judge_test_accuracy', 0):.3f}",
    ]


def main(argv: Optional[list[str]] = None) -> TinyArtifacts:
    parser = argparse.ArgumentParser(description="Build the offline tiny models and synthetic data (reused when current).")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp says the build is current")
    args = parser.parse_args(argv)
    artifacts = build_tiny_artifacts(args.out, force=args.force)
    print("\n".join(summary_lines(artifacts)))
    return artifacts


if __name__ == "__main__":
    run_cli(main)
