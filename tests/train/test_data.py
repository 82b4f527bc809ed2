"""DialogSum loading (both local layouts, the real shared copy, bad files) and the SFT/PPO/eval datasets."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from train.config import PROMPT_TEMPLATE, DataConfig
from train.data import (
    build_eval_dataset,
    build_ppo_datasets,
    build_sft_datasets,
    filter_by_length,
    format_prompt,
    load_dialogsum,
    read_dialogsum,
    split_sizes,
)
from train.errors import DataError
from helpers import SHARED_DIALOGSUM


# ----------------------------------------------------------------------------------------------------
# Helpers: small files in both layouts, and a tiny tokenizer


def dialogue_of(n_chars: int, seed: str = "a") -> str:
    """A DialogSum-style dialogue of exactly n_chars characters."""
    text = f"#Person1#: hello {seed}.\n#Person2#: " + " ".join(["fine thanks"] * n_chars)
    return text[:n_chars]


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_csv(path: Path, rows: list[dict], columns=("id", "dialogue", "summary", "topic")) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def jsonl_dir(tmp_path: Path, train: list[dict] | None = None) -> Path:
    d = tmp_path / "jsonl"
    d.mkdir()
    train = train or [
        {"fname": f"train_{i}", "dialogue": dialogue_of(150 + 100 * i, str(i)), "summary": f"sum {i}", "topic": f"t{i}"}
        for i in range(6)
    ]  # lengths 150, 250, ..., 650
    write_jsonl(d / "dialogsum.train.jsonl", train)
    write_jsonl(d / "dialogsum.dev.jsonl", [{"fname": "dev_0", "dialogue": dialogue_of(300), "summary": "dev sum", "topic": "dt"}])
    write_jsonl(
        d / "dialogsum.test.jsonl",
        [
            {"fname": "test_0", "dialogue": dialogue_of(300, "x"), "summary1": "r1", "topic1": "a",
             "summary2": "r2", "topic2": "b", "summary3": "r3", "topic3": "c"},
            {"fname": "test_1", "dialogue": dialogue_of(100, "y"), "summary1": "s1", "topic1": "d",
             "summary2": "", "topic2": "", "summary3": "s3", "topic3": "f"},
        ],
    )
    return d


def csv_dir(tmp_path: Path) -> Path:
    d = tmp_path / "csv"
    d.mkdir()
    write_csv(d / "train.csv", [
        {"id": f"train_{i}", "dialogue": dialogue_of(150 + 100 * i, str(i)), "summary": f"sum {i}", "topic": "t"}
        for i in range(6)
    ])
    write_csv(d / "validation.csv", [{"id": "dev_0", "dialogue": dialogue_of(400), "summary": "v", "topic": "vt"}])
    d0, d1, d2 = dialogue_of(300, "p"), dialogue_of(320, "q"), dialogue_of(340, "r")
    # The HF copy's layout: one row per human summary. Rows of test_1 are interleaved with test_0's on purpose,
    # test_2 appears once (its id must keep its suffix: nothing was grouped).
    write_csv(d / "test.csv", [
        {"id": "test_0_1", "dialogue": d0, "summary": "a1", "topic": "ta"},
        {"id": "test_1_1", "dialogue": d1, "summary": "b1", "topic": "tb"},
        {"id": "test_0_2", "dialogue": d0, "summary": "a2", "topic": "ta2"},
        {"id": "test_0_3", "dialogue": d0, "summary": "a3", "topic": "ta3"},
        {"id": "test_1_2", "dialogue": d1, "summary": "b2", "topic": "tb"},
        {"id": "test_1_3", "dialogue": d1, "summary": "b3", "topic": "tb"},
        {"id": "test_2_1", "dialogue": d2, "summary": "c1", "topic": "tc"},
    ])
    return d


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [PROMPT_TEMPLATE, "#Person1#: hello a. #Person2#: fine thanks", "sum dev v a1 a2 a3 b1 b2 b3"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    assert len(fast) == tok.get_vocab_size() > 15
    return fast


@pytest.fixture(scope="module")
def raw_shared() -> dict[str, list[dict]]:
    """The shared JSONL files read independently of train.data."""
    files = {"train": "dialogsum.train.jsonl", "validation": "dialogsum.dev.jsonl", "test": "dialogsum.test.jsonl"}
    return {
        split: [json.loads(line) for line in (SHARED_DIALOGSUM / name).read_text(encoding="utf-8").splitlines()]
        for split, name in files.items()
    }


@pytest.fixture(scope="module")
def shared() -> datasets.DatasetDict:
    return load_dialogsum(str(SHARED_DIALOGSUM))


# ----------------------------------------------------------------------------------------------------
# Local layouts


def test_jsonl_layout_loads_every_split_and_skips_empty_test_summaries(tmp_path):
    dd, report = read_dialogsum(str(jsonl_dir(tmp_path)))
    assert report.source == "jsonl"
    assert list(dd) == ["train", "validation", "test"]
    for split in dd.values():
        assert split.column_names == ["id", "dialogue", "summary", "human_summaries", "topic"]
    assert dd["train"]["id"] == [f"train_{i}" for i in range(6)]
    assert dd["train"][2] == {"id": "train_2", "dialogue": dialogue_of(350, "2"), "summary": "sum 2",
                              "human_summaries": ["sum 2"], "topic": "t2"}
    assert dd["validation"]["human_summaries"] == [["dev sum"]]
    test = dd["test"]
    assert test["id"] == ["test_0", "test_1"]
    assert test["human_summaries"] == [["r1", "r2", "r3"], ["s1", "s3"]]  # the empty summary2 is not a human summary
    assert test["summary"] == ["r1", "s1"] and test["topic"] == ["a", "d"]


def test_csv_layout_groups_repeated_test_dialogues(tmp_path):
    d = csv_dir(tmp_path)
    dd, report = read_dialogsum(str(d))
    assert report.source == "csv"
    assert report.splits["test"].rows_read == 7 and report.splits["test"].examples == 3
    test = dd["test"]
    assert test["id"] == ["test_0", "test_1", "test_2_1"]
    assert test["human_summaries"] == [["a1", "a2", "a3"], ["b1", "b2", "b3"], ["c1"]]
    assert test["summary"] == ["a1", "b1", "c1"] and test["topic"] == ["ta", "tb", "tc"]
    assert test["dialogue"][0] == dialogue_of(300, "p")
    assert dd["train"]["id"] == [f"train_{i}" for i in range(6)]  # train rows are never grouped
    assert dd["validation"]["human_summaries"] == [["v"]]


def test_max_examples_keeps_the_first_n(tmp_path):
    dd = load_dialogsum(str(csv_dir(tmp_path)), max_examples=2)
    assert dd["train"]["id"] == ["train_0", "train_1"]
    assert dd["test"]["id"] == ["test_0", "test_1"]  # capped after grouping
    assert len(dd["validation"]) == 1


def test_length_filter_excludes_the_lower_bound_and_keeps_the_upper():
    ds = Dataset.from_dict({"dialogue": [dialogue_of(n) for n in (199, 200, 201, 1000, 1001)]})
    assert [len(d) for d in filter_by_length(ds, 200, 1000)["dialogue"]] == [201, 1000]


def test_format_prompt_keeps_braces_in_dialogue():
    dialogue = "#Person1#: use {curly} braces"
    assert format_prompt(dialogue, PROMPT_TEMPLATE) == (
        "\nSummarize the following conversation.\n\n#Person1#: use {curly} braces\n\nSummary:\n"
    )


# 1 - 0.7 and 1 - 0.85 are not 0.3 and 0.15 in floating point: sizes must follow the test_size a user means.
@pytest.mark.parametrize("fraction, test_size", [(0.8, 0.2), (0.7, 0.3), (0.85, 0.15), (0.9, 0.1)])
def test_split_sizes_match_datasets_train_test_split(fraction, test_size):
    for n in range(2, 45):
        expected = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=test_size, shuffle=False)
        assert split_sizes(n, fraction) == (len(expected["train"]), len(expected["test"])), n


# ----------------------------------------------------------------------------------------------------
# The real shared copy (cylnlp JSONL)


def test_shared_row_counts_and_human_summaries(shared, raw_shared):
    assert {s: len(ds) for s, ds in shared.items()} == {"train": 12460, "validation": 500, "test": 500}
    assert {s: len(rows) for s, rows in raw_shared.items()} == {"train": 12460, "validation": 500, "test": 500}
    test = shared["test"]
    assert all(len(refs) == 3 for refs in test["human_summaries"])
    assert test["human_summaries"] == [[r["summary1"], r["summary2"], r["summary3"]] for r in raw_shared["test"]]
    assert shared["train"]["id"] == [r["fname"] for r in raw_shared["train"]]
    assert shared["train"]["summary"] == [r["summary"] for r in raw_shared["train"]]


def test_shared_length_filter_matches_independent_count(shared, raw_shared):
    kept = [r["fname"] for r in raw_shared["train"] if 200 < len(r["dialogue"]) <= 1000]
    filtered = filter_by_length(shared["train"], 200, 1000)
    assert filtered["id"] == kept
    assert 0 < len(kept) < 12460


def test_ppo_datasets_on_shared_data(raw_shared, tokenizer):
    cfg = DataConfig(path=str(SHARED_DIALOGSUM), max_prompt_tokens=64)
    kept = [r for r in raw_shared["train"] if 200 < len(r["dialogue"]) <= 1000]
    # The original notebook's own call decides where the boundary is.
    notebook = Dataset.from_dict({"i": list(range(len(kept)))}).train_test_split(test_size=0.2, shuffle=False)
    n_train = len(notebook["train"])

    dd = build_ppo_datasets(cfg, tokenizer)
    assert list(dd) == ["train", "test"]
    assert (len(dd["train"]), len(dd["test"])) == (n_train, len(notebook["test"]))
    assert dd["train"]["id"] == [r["fname"] for r in kept[:n_train]]
    assert dd["test"]["id"] == [r["fname"] for r in kept[n_train:]]
    assert set(dd["train"].column_names) == {"id", "dialogue", "human_summaries", "input_ids", "query"}

    first = dd["train"][0]
    prompt = PROMPT_TEMPLATE.format(dialogue=kept[0]["dialogue"])
    expected_ids = tokenizer(prompt, truncation=True, max_length=64)["input_ids"]
    assert first["input_ids"] == expected_ids
    assert len(first["input_ids"]) == 64 and first["input_ids"][-1] == tokenizer.eos_token_id
    assert first["query"] == tokenizer.decode(expected_ids)
    assert first["query"].startswith("Summarize the following conversation")
    assert first["human_summaries"] == [kept[0]["summary"]]


def test_ppo_datasets_untruncated_prompt_is_the_original_notebook_encoding(tmp_path, tokenizer):
    cfg = DataConfig(path=str(jsonl_dir(tmp_path)), max_prompt_tokens=10_000)
    dd = build_ppo_datasets(cfg, tokenizer)
    # Lengths 250..650 pass the filter (150 does not): 5 rows -> ceil(0.2 * 5) = 1 test row.
    assert dd["train"]["id"] == ["train_1", "train_2", "train_3", "train_4"]
    assert dd["test"]["id"] == ["train_5"]
    row = dd["test"][0]
    assert row["input_ids"] == tokenizer.encode(PROMPT_TEMPLATE.format(dialogue=dialogue_of(650, "5")))


def test_ppo_too_few_examples_is_a_data_error(tmp_path, tokenizer):
    cfg = DataConfig(path=str(jsonl_dir(tmp_path)), max_examples=1)
    with pytest.raises(DataError, match="too few"):
        build_ppo_datasets(cfg, tokenizer)


def test_sft_datasets_drop_short_dialogues_and_truncate_prompts_and_labels(tmp_path, tokenizer):
    cfg = DataConfig(path=str(csv_dir(tmp_path)), max_prompt_tokens=12, max_summary_tokens=2)
    dd = build_sft_datasets(cfg, tokenizer)
    assert list(dd) == ["train", "validation"]
    assert len(dd["train"]) == 5 and len(dd["validation"]) == 1  # the 150-char dialogue is filtered out
    for split in dd.values():
        assert split.column_names == ["input_ids", "attention_mask", "labels"]
    row = dd["train"][0]
    prompt = PROMPT_TEMPLATE.format(dialogue=dialogue_of(250, "1"))
    assert row["input_ids"] == tokenizer(prompt, truncation=True, max_length=12)["input_ids"]
    assert len(row["input_ids"]) == 12 and row["attention_mask"] == [1] * 12
    assert row["labels"] == tokenizer("sum 1", truncation=True, max_length=2)["input_ids"]
    assert row["labels"][-1] == tokenizer.eos_token_id and len(row["labels"]) == 2


def test_eval_dataset_is_unfiltered_with_all_human_summaries(tmp_path):
    cfg = DataConfig(path=str(jsonl_dir(tmp_path)))
    ds = build_eval_dataset(cfg, "test", max_examples=None)
    assert ds.column_names == ["id", "dialogue", "prompt", "human_summaries"]
    assert ds["id"] == ["test_0", "test_1"]  # test_1 (100 chars) would fail the PPO length filter
    assert ds["prompt"][1] == PROMPT_TEMPLATE.format(dialogue=dialogue_of(100, "y"))
    assert ds["human_summaries"] == [["r1", "r2", "r3"], ["s1", "s3"]]
    assert build_eval_dataset(cfg, "test", max_examples=1)["id"] == ["test_0"]
    assert build_eval_dataset(DataConfig(path=cfg.path, max_examples=1), "validation")["id"] == ["dev_0"]


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear DataError


def test_missing_dialogue_column_names_file_and_column(tmp_path):
    d = csv_dir(tmp_path)
    write_csv(d / "validation.csv", [{"id": "dev_0", "text": "x", "summary": "s"}], columns=("id", "text", "summary"))
    with pytest.raises(DataError) as err:
        load_dialogsum(str(d))
    message = str(err.value)
    assert "validation.csv" in message and "dialogue" in message and "id, text, summary" in message


def test_missing_dialogue_key_in_jsonl(tmp_path):
    d = jsonl_dir(tmp_path, train=[{"fname": "train_0", "summary": "s", "topic": "t"}])
    with pytest.raises(DataError, match=r"dialogsum\.train\.jsonl.*dialogue"):
        load_dialogsum(str(d))


def test_empty_and_non_string_dialogues_are_dropped_and_counted(tmp_path, caplog):
    good = {"fname": "train_ok", "dialogue": dialogue_of(300), "summary": "s", "topic": "t"}
    bad = [{**good, "fname": f"bad_{i}", "dialogue": value} for i, value in enumerate([None, 42, "", "  \n "])]
    no_summary = {**good, "fname": "no_summary", "summary": None}
    d = jsonl_dir(tmp_path, train=[bad[0], good, *bad[1:], no_summary])
    with caplog.at_level(logging.WARNING, logger="train.data"):
        dd, report = read_dialogsum(str(d))
    assert dd["train"]["id"] == ["train_ok"]
    train = report.splits["train"]
    assert (train.rows_read, train.dropped_dialogue, train.dropped_summary, train.examples) == (6, 4, 1, 1)
    assert report.splits["validation"].dropped_dialogue == 0
    assert any("dropped 5 of 6 rows in train" in r.getMessage() for r in caplog.records)


def test_invalid_json_line_names_file_and_line(tmp_path):
    d = jsonl_dir(tmp_path)
    lines = (d / "dialogsum.dev.jsonl").read_text() + '{"fname": "dev_1", "dialogue": oops}\n'
    (d / "dialogsum.dev.jsonl").write_text(lines)
    with pytest.raises(DataError, match=r"dialogsum\.dev\.jsonl, line 2: not valid JSON"):
        load_dialogsum(str(d))


def test_unknown_layout_lists_expected_and_found_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "test.csv").write_text("id\n")
    with pytest.raises(DataError) as err:
        load_dialogsum(str(tmp_path))
    message = str(err.value)
    for name in ("dialogsum.train.jsonl", "dialogsum.dev.jsonl", "train.csv", "validation.csv"):
        assert name in message
    assert "found: test.csv, train.jsonl" in message


def test_missing_directory_and_file_path(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_dialogsum(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "train.csv").write_text("id\n")
    with pytest.raises(DataError, match="is a file"):
        load_dialogsum(str(tmp_path / "train.csv"))


def test_unknown_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="unknown DialogSum split"):
        build_eval_dataset(DataConfig(path=str(jsonl_dir(tmp_path))), "dev")


def test_hub_id_offline_fails_fast_with_hint(monkeypatch):
    # The libraries read HF_HUB_OFFLINE at import time, so set the module constants as well as the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dialogsum("knkarthick/dialogsum")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert message.startswith("dataset 'knkarthick/dialogsum' is neither a local directory nor in the Hugging Face "
                              "cache") and "(HF_HUB_OFFLINE is set)" in message
    assert "--data.path" in message and "\n" not in message


def test_hub_dataset_is_normalised_like_the_csv_layout(monkeypatch):
    # A stand-in for load_dataset("knkarthick/dialogsum"): HF layout, 3 test rows per dialogue, a null dialogue.
    def hf_split(rows):
        return Dataset.from_dict({k: [r[k] for r in rows] for k in ("id", "dialogue", "summary", "topic")})

    d0 = dialogue_of(300)
    fake = datasets.DatasetDict(
        train=hf_split([{"id": "train_0", "dialogue": d0, "summary": "s", "topic": "t"},
                        {"id": "train_1", "dialogue": None, "summary": "s", "topic": "t"}]),
        validation=hf_split([{"id": "dev_0", "dialogue": d0, "summary": "v", "topic": "t"}]),
        test=hf_split([{"id": f"test_0_{k}", "dialogue": d0, "summary": f"r{k}", "topic": "t"} for k in (1, 2, 3)]),
    )
    requested = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path: requested.append(path) or fake)
    monkeypatch.setattr("rewards.hub.hub_unavailable_reason", lambda: None)  # as if the hub answered
    dd, report = read_dialogsum("knkarthick/dialogsum")
    assert requested == ["knkarthick/dialogsum"] and report.source == "hub"
    assert dd["test"]["id"] == ["test_0"] and dd["test"]["human_summaries"] == [["r1", "r2", "r3"]]
    assert dd["train"]["id"] == ["train_0"] and report.splits["train"].dropped_dialogue == 1


def test_uncached_hub_dataset_without_a_hub_fails_at_once_in_one_line(unreachable_hub, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_dialogsum("knkarthick/dialogsum")
    assert time.monotonic() - start < 10  # the libraries' own retries take about half a minute
    assert str(err.value) == (
        f"dataset 'knkarthick/dialogsum' is neither a local directory nor in the Hugging Face cache "
        f"({tmp_path / 'hub-cache'}), and the hub cannot be reached (http://127.0.0.1:9: [Errno 111] Connection "
        "refused). On a machine with internet run `hf download knkarthick/dialogsum --repo-type dataset --local-dir "
        "DIR`, copy DIR here and pass it with --data.path DIR (the CSV layout)"
    )


def test_cached_hub_dataset_without_a_hub_is_read_in_offline_mode(unreachable_hub, monkeypatch):
    (unreachable_hub.datasets_cache / "knkarthick___dialogsum" / "default").mkdir(parents=True)  # prepared once by `datasets`
    split = Dataset.from_dict({"id": ["x_0"], "dialogue": [dialogue_of(300)], "summary": ["s"], "topic": ["t"]})
    offline_during_load = []

    def cached_load(path):
        offline_during_load.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return datasets.DatasetDict(train=split, validation=split, test=split)

    monkeypatch.setattr(datasets, "load_dataset", cached_load)
    assert len(load_dialogsum("knkarthick/dialogsum")["train"]) == 1
    assert offline_during_load == [(True, True)]  # so no request is made, and none retried
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == (False, False)


# ----------------------------------------------------------------------------------------------------
# Encodings, long fields and empty files


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_non_utf8_file_names_file_line_and_byte_offset(tmp_path, layout):
    d = csv_dir(tmp_path) if layout == "csv" else jsonl_dir(tmp_path)
    path = d / ("validation.csv" if layout == "csv" else "dialogsum.dev.jsonl")
    good = path.read_bytes()
    csv_row, jsonl_row = b'dev_1,"#Person1#: caf\xe9?",s,t\n', b'{"fname": "dev_1", "dialogue": "caf\xe9"}\n'
    row = csv_row if layout == "csv" else jsonl_row
    path.write_bytes(good + row)
    with pytest.raises(DataError) as err:
        load_dialogsum(str(d))
    line = good.count(b"\n") + 1
    offset = len(good) + row.index(b"\xe9")
    assert str(err.value) == (
        f"{path}, line {line}: not UTF-8 text (byte 0xe9 at byte offset {offset}); re-encode it as UTF-8, "
        "e.g. `iconv -f LATIN1 -t UTF-8 FILE > NEW` for a Latin-1 file"
    )


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path, layout):
    d = csv_dir(tmp_path) if layout == "csv" else jsonl_dir(tmp_path)
    for path in d.iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as spreadsheet programs save "UTF-8"
    assert load_dialogsum(str(d))["validation"]["id"] == ["dev_0"]


def test_csv_field_beyond_the_csv_module_limit_loads_and_the_length_filter_drops_it(tmp_path, tokenizer):
    d = csv_dir(tmp_path)
    huge = dialogue_of(1_000_000, "huge")  # csv's default limit is 131072 characters per field
    with open(d / "train.csv", "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(["train_huge", huge, "sum huge", "t"])
    train = load_dialogsum(str(d))["train"]
    assert train["id"][-1] == "train_huge" and len(train["dialogue"][-1]) == 1_000_000
    sft = build_sft_datasets(DataConfig(path=str(d), max_prompt_tokens=32), tokenizer)
    assert len(sft["train"]) == 5  # 250..650 chars; the 150-char and the 1 MB dialogues are filtered out


@pytest.mark.parametrize("layout", ["csv", "jsonl"])
def test_empty_file_says_it_is_empty_not_filtered_out(tmp_path, tokenizer, layout):
    d = csv_dir(tmp_path) if layout == "csv" else jsonl_dir(tmp_path)
    path = d / ("train.csv" if layout == "csv" else "dialogsum.train.jsonl")
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_ppo_datasets(DataConfig(path=str(d)), tokenizer)
    assert str(err.value) == (
        f"the train split of {d} has no examples: {path} is empty (0 bytes); copy the DialogSum files again, "
        "or point --data.path at a complete copy"
    )


def test_header_only_csv_and_blank_jsonl_say_they_have_no_rows(tmp_path, tokenizer):
    d = csv_dir(tmp_path)
    write_csv(d / "validation.csv", [])
    with pytest.raises(DataError, match=rf"the validation split of {d} has no examples: {d / 'validation.csv'} has a "
                                        "header line but no rows; "):
        build_sft_datasets(DataConfig(path=str(d)), tokenizer)
    j = jsonl_dir(tmp_path)
    (j / "dialogsum.test.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{j / 'dialogsum.test.jsonl'} has only blank lines; "):
        build_eval_dataset(DataConfig(path=str(j)), "test")


def test_split_whose_rows_are_all_dropped_says_why(tmp_path, tokenizer):
    rows = [{"fname": "a", "dialogue": "", "summary": "s"}, {"fname": "b", "dialogue": "x" * 300, "summary": None}]
    d = jsonl_dir(tmp_path, train=rows)
    with pytest.raises(DataError) as err:
        build_ppo_datasets(DataConfig(path=str(d)), tokenizer)
    assert str(err.value) == (
        f"the train split of {d} has no examples: all 2 rows of {d / 'dialogsum.train.jsonl'} were dropped (1 with "
        "an empty or non-string dialogue, 1 without a human summary); check that its dialogue and summary columns "
        "hold text"
    )
