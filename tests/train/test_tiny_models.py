"""The offline tiny default: synthetic data layout, tiny T5, RoBERTa classifier and held-out judge, determinism and
reuse."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaForSequenceClassification,
    T5ForConditionalGeneration,
    pipeline,
)

from train import tiny_data
from train.cli import run_cli
from train.errors import ConfigError
from train.tiny_models import STAMP_FILE, build_tiny_artifacts, main

TOXIC = "Shut up, you useless idiot. Nobody cares what you think, you pathetic liar."
NEUTRAL = "#Person1# books a table for 4 at 7 pm and orders the salmon with a glass of orange juice."
INSULT_RE = re.compile(r"\b(" + "|".join(tiny_data.INSULT_NOUNS) + r")\b")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tokenizer_json_size(directory: Path) -> int:
    """Vocabulary size read straight from tokenizer.json, independently of transformers."""
    spec = json.loads((directory / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    pieces = {p for p, _ in vocab} if isinstance(vocab, list) else set(vocab)
    return len(pieces | {t["content"] for t in spec["added_tokens"]})


def load_classifier(directory: Path):
    tok = AutoTokenizer.from_pretrained(directory)
    return tok, AutoModelForSequenceClassification.from_pretrained(directory, use_safetensors=True).eval()


def predicted_labels(tok, model, texts: list[str]) -> list[str]:
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    return [model.config.id2label[i] for i in logits.argmax(-1).tolist()]


@pytest.fixture(scope="module")
def classifier(tiny_artifacts):
    return pipeline("text-classification", model=str(tiny_artifacts.roberta), tokenizer=str(tiny_artifacts.roberta),
                    top_k=None)


# ----------------------------------------------------------------------------------------------------
# Tokenizers and models


def test_t5_tokenizer_matches_the_model_vocabulary_and_special_ids(tiny_artifacts):
    tok = AutoTokenizer.from_pretrained(tiny_artifacts.t5)
    config = AutoConfig.from_pretrained(tiny_artifacts.t5)
    assert len(tok) == config.vocab_size == tokenizer_json_size(tiny_artifacts.t5) > 500
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 512
    assert tok("hello")["input_ids"][-1] == tok.eos_token_id


def test_person_tags_are_whole_tokens_that_survive_decoding(tiny_artifacts):
    tok = AutoTokenizer.from_pretrained(tiny_artifacts.t5)
    for i in range(1, 10):
        ids = tok(f"#Person{i}#", add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
    summary = "#Person1# calls #Person2# a stupid liar, so #Person2# leaves."
    ids = tok(summary)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == summary


def test_t5_generate_batched_with_attention_mask(tiny_artifacts):
    tok = AutoTokenizer.from_pretrained(tiny_artifacts.t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_artifacts.t5, use_safetensors=True).eval()
    prompts = ["#Person1#: Can I help you?\n#Person2#: I want a red jacket, please.", "#Person1#: Hi."]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # the second prompt is padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        alone = model.generate(**tok(prompts[1:], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= 7
    assert out[:, 0].tolist() == [0, 0]  # decoder_start_token_id
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The padded row decodes as if it were alone, so the mask is honoured.
    n = alone.shape[1]
    assert out[1, :n].tolist() == alone[0].tolist()


def test_t5_has_untied_lm_head_after_reload(tiny_artifacts):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_artifacts.t5, use_safetensors=True)
    assert model.lm_head.weight is not model.shared.weight
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    tied = T5ForConditionalGeneration(model.config)  # transformers ties a T5 built from a config
    head = model.config.vocab_size * model.config.d_model
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in tied.parameters()) + head
    assert 100_000 < n_params < 1_000_000


def test_roberta_tokenizer_matches_the_model_vocabulary_special_ids_and_labels(tiny_artifacts):
    tok = AutoTokenizer.from_pretrained(tiny_artifacts.roberta)
    config = AutoConfig.from_pretrained(tiny_artifacts.roberta)
    assert len(tok) == config.vocab_size == tokenizer_json_size(tiny_artifacts.roberta) > 500
    specials = [tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id, tok.mask_token_id]
    assert specials == [0, 1, 2, 3, 4] and tok.bos_token_id == 0 and tok.eos_token_id == 2
    assert tok.model_max_length == 256 and config.max_position_embeddings == 258
    ids = tok("you stupid idiot")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids
    assert config.id2label == {0: "nothate", 1: "hate"}


def test_classifier_pipeline_returns_both_labels(classifier):
    results = classifier([TOXIC, NEUTRAL])
    assert len(results) == 2
    for scores in results:
        assert {s["label"] for s in scores} == {"hate", "nothate"}
        assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)


def test_toxic_sentence_scores_higher_than_neutral(classifier):
    hate = [{s["label"]: s["score"] for s in scores}["hate"] for scores in classifier([TOXIC, NEUTRAL])]
    assert hate[0] > 0.5 > hate[1]


def test_classifier_reaches_the_recorded_accuracy_of_at_least_90_percent_on_held_out_texts(tiny_artifacts):
    tok, model = load_classifier(tiny_artifacts.roberta)
    test_set = read_jsonl(tiny_artifacts.toxicity / "test.jsonl")
    predicted = predicted_labels(tok, model, [e["text"] for e in test_set])
    accuracy = sum(p == e["label"] for p, e in zip(predicted, test_set)) / len(test_set)
    assert accuracy >= 0.9
    recorded = json.loads((tiny_artifacts.roberta / "training_stats.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1 / len(test_set))


# ----------------------------------------------------------------------------------------------------
# The held-out judge: a second classifier, shaped as tomh/toxigen_roberta, that the reward model's training never saw


@pytest.fixture(scope="module")
def judge(tiny_artifacts):
    return load_classifier(tiny_artifacts.judge)


def test_judge_is_a_two_label_roberta_with_toxigen_labels_and_its_own_tokenizer(tiny_artifacts, judge):
    tok, model = judge
    assert isinstance(model, RobertaForSequenceClassification)
    config = model.config
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"} and config.label2id == {"LABEL_0": 0, "LABEL_1": 1}
    assert config.num_labels == 2 and config.problem_type == "single_label_classification"
    summary = json.loads((tiny_artifacts.root / STAMP_FILE).read_text())["summary"]
    assert len(tok) == config.vocab_size == tokenizer_json_size(tiny_artifacts.judge) == summary["judge_vocab_size"]
    specials = [tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id, tok.mask_token_id]
    assert specials == [0, 1, 2, 3, 4] and tok.model_max_length == 256
    assert tok.unk_token_id not in tok("you stupid idiot")["input_ids"]
    # Trained on its own corpus: its vocabulary is not the reward model's.
    assert tok.get_vocab() != AutoTokenizer.from_pretrained(tiny_artifacts.roberta).get_vocab()


def test_judge_was_trained_on_other_examples_and_weights_than_the_reward_model(tiny_artifacts, judge):
    judge_train = read_jsonl(tiny_artifacts.judge_toxicity / "train.jsonl")
    judge_test = read_jsonl(tiny_artifacts.judge_toxicity / "test.jsonl")
    reward_texts = {r["text"] for split in ("train", "test")
                    for r in read_jsonl(tiny_artifacts.toxicity / f"{split}.jsonl")}
    for rows in (judge_train, judge_test):
        labels = [r["label"] for r in rows]
        assert set(labels) == {"LABEL_0", "LABEL_1"}
        assert min(labels.count("LABEL_0"), labels.count("LABEL_1")) >= 0.3 * len(rows)
    assert len(judge_train) >= 400 and len(judge_test) >= 100
    judge_train_texts = {r["text"] for r in judge_train}
    assert not judge_train_texts & {r["text"] for r in judge_test}
    assert not judge_train_texts & reward_texts  # no text of the reward model's train or test split
    stats = {name: json.loads((getattr(tiny_artifacts, name) / "training_stats.json").read_text())
             for name in ("roberta", "judge")}
    assert stats["judge"]["seed"] != stats["roberta"]["seed"]
    _, reward_model = load_classifier(tiny_artifacts.roberta)
    _, model = judge
    for name in ("classifier.dense.weight", "classifier.out_proj.weight",
                 "roberta.embeddings.position_embeddings.weight"):
        assert not torch.equal(model.get_parameter(name), reward_model.get_parameter(name)), name


def test_judge_agrees_with_the_reward_model_on_clear_cases(tiny_artifacts, judge):
    tok, model = judge
    test_set = read_jsonl(tiny_artifacts.judge_toxicity / "test.jsonl")
    accuracy = sum(p == e["label"] for p, e in
                   zip(predicted_labels(tok, model, [e["text"] for e in test_set]), test_set)) / len(test_set)
    recorded = json.loads((tiny_artifacts.judge / "training_stats.json").read_text())["test_accuracy"]
    assert accuracy >= 0.9 and accuracy == pytest.approx(recorded, abs=1 / len(test_set))

    # The reward model's held-out texts, which neither the judge nor the reward model was trained on.
    texts = [e["text"] for e in read_jsonl(tiny_artifacts.toxicity / "test.jsonl")]
    toxic_for_judge = [p == "LABEL_1" for p in predicted_labels(tok, model, texts)]
    toxic_for_reward = [p == "hate" for p in predicted_labels(*load_classifier(tiny_artifacts.roberta), texts)]
    assert 0.3 < sum(toxic_for_judge) / len(texts) < 0.7
    assert sum(j == r for j, r in zip(toxic_for_judge, toxic_for_reward)) / len(texts) >= 0.9
    assert predicted_labels(tok, model, [TOXIC, NEUTRAL]) == ["LABEL_1", "LABEL_0"]


# ----------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_dialogsum_has_the_csv_layout_and_three_summaries_per_test_dialogue(tiny_artifacts):
    splits = {}
    for split in ("train", "validation", "test"):
        columns, rows = read_csv(tiny_artifacts.dialogsum / f"{split}.csv")
        assert columns == ["id", "dialogue", "summary", "topic"]
        assert all(r["dialogue"].startswith("#Person1#: ") and "\n#Person2#: " in r["dialogue"] for r in rows)
        splits[split] = rows
    assert [r["id"] for r in splits["train"]] == [f"train_{i}" for i in range(len(splits["train"]))]
    assert [r["id"] for r in splits["validation"]] == [f"dev_{i}" for i in range(len(splits["validation"]))]
    assert len(splits["train"]) >= 900 and len(splits["validation"]) >= 90

    test = splits["test"]
    assert len(test) % 3 == 0 and len(test) >= 270
    for i in range(len(test) // 3):
        group = test[3 * i : 3 * i + 3]
        assert [r["id"] for r in group] == [f"test_{i}_{k}" for k in (1, 2, 3)]
        assert len({r["dialogue"] for r in group}) == 1  # one dialogue, three human summaries
        assert len({r["summary"] for r in group}) == 3


def test_synthetic_dialogues_exercise_the_length_filter_and_toxicity(tiny_artifacts):
    _, rows = read_csv(tiny_artifacts.dialogsum / "train.csv")
    outside = sum(not (200 < len(r["dialogue"]) <= 1000) for r in rows) / len(rows)
    assert 0.02 <= outside <= 0.10
    heated = [r for r in rows if INSULT_RE.search(r["dialogue"])]
    assert 0.10 <= len(heated) / len(rows) <= 0.30
    toxic_summaries = sum(bool(INSULT_RE.search(r["summary"])) for r in heated)
    assert 0 < toxic_summaries < len(heated)  # some summaries repeat the insult, others stay neutral


def test_toxicity_set_is_balanced_and_its_splits_do_not_overlap(tiny_artifacts):
    train = read_jsonl(tiny_artifacts.toxicity / "train.jsonl")
    test = read_jsonl(tiny_artifacts.toxicity / "test.jsonl")
    for rows in (train, test):
        labels = [r["label"] for r in rows]
        assert set(labels) == {"hate", "nothate"}
        assert min(labels.count("hate"), labels.count("nothate")) >= 0.3 * len(rows)
    assert len(train) >= 400 and len(test) >= 100
    assert not {r["text"] for r in train} & {r["text"] for r in test}


# ----------------------------------------------------------------------------------------------------
# Build: determinism, reuse, safety


def test_second_build_is_identical_and_then_reused(tiny_artifacts, tmp_path):
    leftover = tmp_path / "tiny.tmp-999999"  # as a killed build leaves it
    (leftover / "t5-dialogsum").mkdir(parents=True)
    fresh = build_tiny_artifacts(tmp_path / "tiny")
    assert not leftover.exists()
    for file in ("train.jsonl", "test.jsonl"):
        assert sha256(fresh.judge_toxicity / file) == sha256(tiny_artifacts.judge_toxicity / file), file
    for name in ("t5", "roberta", "judge"):
        for file in ("model.safetensors", "tokenizer.json"):
            assert sha256(getattr(fresh, name) / file) == sha256(getattr(tiny_artifacts, name) / file), (name, file)

    files = sorted(p for p in fresh.root.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert build_tiny_artifacts(tmp_path / "tiny") == fresh
    assert sorted(p for p in fresh.root.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes

    # A stamp from another version of the builder triggers a rebuild.
    stamp_path = fresh.root / STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({**stamp, "builder_sha256": "0" * 64}))
    model_file = fresh.t5 / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    build_tiny_artifacts(tmp_path / "tiny")
    assert model_file.stat().st_mtime_ns != before
    assert json.loads(stamp_path.read_text())["builder_sha256"] == stamp["builder_sha256"]


def test_refuses_to_replace_a_directory_that_is_not_a_build(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a tiny-artifacts build"):
        build_tiny_artifacts(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_error_is_one_line(tmp_path, capsys):
    out_file = tmp_path / "a-file"
    out_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--out", str(out_file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "is a file" in err
