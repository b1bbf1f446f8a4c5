"""Training data: JSONL/CSV readers with file:line errors, tokenisation, label masks, batches.

Two tasks:
- ``classification``: records ``{"text": str, "label": str | int}`` (JSONL, or CSV with a header
  holding ``text`` and ``label`` columns) for an encoder with a sequence-classification head.
- ``causal``: instruction records ``{"instruction", "input"?, "output"}`` or chat records
  ``{"messages": [{"role", "content"}, ...]}`` for a decoder; the loss covers the response
  (assistant) tokens only.

The embedded default set (:func:`default_classification_data`) is generated, deterministic, and
needs nothing from the network.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

_log = logging.getLogger("fastlora")
IGNORE = -100  # label value the loss skips

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and line."""


@dataclasses.dataclass
class Example:
    """One tokenised example: ``input_ids`` (L,) and ``labels`` (L,) for causal LM, or a class index."""

    input_ids: list[int]
    labels: list[int] | int
    line: int  # 1-based line in its file (for messages)


# -- reading ------------------------------------------------------------------------------------


def detect_task(records: list[dict[str, Any]]) -> str:
    """ "classification" for text/label records, "causal" for instruction or chat records."""
    first = records[0]
    if "messages" in first or "instruction" in first:
        return "causal"
    if "text" in first and "label" in first:
        return "classification"
    raise DataError(
        f"cannot tell the task from the first record's keys {sorted(first)}: expected text/label (classification), "
        "instruction/output or messages (causal LM)"
    )


def _validate(record: Any, task: str | None) -> str | None:
    """None when the record is usable for ``task`` (any task when None), else why not."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    if task in (None, "classification") and "text" in record:
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            return "'text' must be a non-empty string"
        if "label" not in record or not isinstance(record["label"], (str, int)) or isinstance(record["label"], bool):
            return "'label' must be a string or an integer"
        return None
    if task in (None, "causal") and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return "each message needs string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message: nothing to learn from"
        return None
    if task in (None, "causal") and "instruction" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                return f"'{key}' must be a string"
        if not isinstance(record.get("input", ""), str):
            return "'input' must be a string"
        return None
    wanted = {"classification": "text and label", "causal": "instruction/output or messages"}
    expected = wanted.get(task, "text/label, instruction/output or messages")
    return f"missing keys: expected {expected}, found {sorted(record)}"


def read_records(path: str, *, task: str | None = None, on_bad_line: str = "error") -> list[tuple[int, dict]]:
    """(line number, record) pairs of a ``.jsonl``/``.json`` or ``.csv`` file (UTF-8, a leading byte-order mark
    allowed, as spreadsheets write it).

    A malformed line (bad JSON, wrong keys, bytes that are not UTF-8) raises :class:`DataError` naming
    ``file:line`` (``on_bad_line="error"``), or is skipped with one warning counting them (``"skip"``).
    """
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"fastlora: on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    out: list[tuple[int, dict]] = []
    bad: list[str] = []

    def reject(line: int, why: str) -> None:
        message = f"{path}:{line}: {why}"
        if on_bad_line == "error":
            raise DataError(message + " (pass --on-bad-line skip to skip such lines)")
        bad.append(message)

    text = _decode(path, reject)
    if path.endswith(".csv"):
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path}:1: a CSV needs a header with 'text' and 'label', found {reader.fieldnames}")
            for row in reader:
                line = reader.line_num
                label = row.get("label")
                if label is not None and label.strip().lstrip("-").isdigit():
                    row["label"] = int(label)
                why = _validate({"text": row.get("text"), "label": row.get("label")}, "classification")
                if why:
                    reject(line, why)
                else:
                    out.append((line, {"text": row["text"], "label": row["label"]}))
    else:
        # line ends as a text-mode file reads them (not str.splitlines, which also splits at U+2028 and others
        # that JSON strings may hold unescaped)
        for line, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                reject(line, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            why = _validate(record, task)
            if why is None and task is None and out:
                why = _validate(record, detect_task([out[0][1]]))
            if why:
                reject(line, why)
            else:
                out.append((line, record))
    if bad:
        _log.warning("fastlora: skipped %d malformed line(s) of %s, first: %s", len(bad), path, bad[0])
    if not out:
        raise DataError(f"{path}: no usable records")
    return out


def _decode(path: str, reject: Callable[[int, str], None]) -> str:
    """The text of ``path``: UTF-8 without its byte-order mark. A line that is not UTF-8 goes to ``reject``
    (which raises, or records it and the line becomes empty, so later line numbers stay right)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}:1: the file is UTF-16 (a spreadsheet's 'Unicode text'); save it as UTF-8")
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, chunk in enumerate(raw.splitlines(keepends=True), 1):  # bytes split at \n, \r\n and \r only
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            where = f"byte 0x{chunk[e.start]:02x} at byte {e.start + 1} of the line"
            reject(number, f"not UTF-8 ({where}); save the file as UTF-8")
            lines.append("\n")
    return "".join(lines)


# -- tokenising ---------------------------------------------------------------------------------


class _Truncations:
    def __init__(self, max_length: int, where: str) -> None:
        self.max_length, self.where, self.count = max_length, where, 0

    def warn(self) -> None:
        if self.count:
            _log.warning(
                "fastlora: %d example(s) of %s longer than %d tokens were truncated",
                self.count,
                self.where,
                self.max_length,
            )


def encode_classification(
    records: list[tuple[int, dict]], tokenizer, label_names: list[str], max_length: int, where: str
) -> list[Example]:
    """Token ids (truncated to ``max_length`` with a warning) and class indices into ``label_names``."""
    index = {name: i for i, name in enumerate(label_names)}
    unseen = sorted({str(r["label"]) for _, r in records} - set(index))
    if unseen:
        raise DataError(f"{where}: label(s) {unseen} do not occur in the training data (known: {label_names})")
    trunc = _Truncations(max_length, where)
    out = []
    for line, record in records:
        ids = tokenizer(record["text"], add_special_tokens=True, truncation=False)["input_ids"]
        if len(ids) > max_length:
            trunc.count += 1
            ids = ids[: max_length - 1] + ids[-1:]  # keep the closing special token ([SEP])
        out.append(Example(ids, index[str(record["label"])], line))
    trunc.warn()
    return out


def _segments(record: dict, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of a causal record in order."""
    if "instruction" in record:
        template = PROMPT_TEMPLATE_INPUT if record.get("input") else PROMPT_TEMPLATE
        return [(template.format(**{"input": "", **record}), False), (record["output"], True)]
    pieces = []
    for m in record["messages"]:
        if m["role"] == "assistant":
            pieces += [("<|assistant|>\n", False), (m["content"], True), ("\n", False)]
        else:
            pieces.append((f"<|{m['role']}|>\n{m['content']}\n", False))
    return pieces


def encode_causal(records: list[tuple[int, dict]], tokenizer, max_length: int, where: str) -> list[Example]:
    """Token ids with labels equal to the ids on response tokens and ``IGNORE`` elsewhere.

    A BOS token starts the sequence and an EOS token (a target) ends each response when the
    tokenizer has them. Over-long examples are truncated (warned once with a count).
    """
    trunc = _Truncations(max_length, where)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    out = []
    for line, record in records:
        ids: list[int] = [bos] if bos is not None else []
        labels: list[int] = [IGNORE] * len(ids)
        for text, target in _segments(record, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            if target and eos is not None:
                piece = [*piece, eos]
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
        if len(ids) > max_length:
            trunc.count += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            continue  # the response was cut away entirely: nothing to learn (counted as truncated)
        out.append(Example(ids, labels, line))
    trunc.warn()
    if not out:
        raise DataError(f"{where}: every example was truncated before its response; raise --max-length")
    return out


# -- batching -----------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` (B, L) int64 and ``labels`` ((B,) or (B, L))."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    if task == "classification":
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of ``epoch``: a permutation that depends only on (seed, epoch), so a resumed
    run finds its place from the step count alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> Iterator[list[Example]]:
    """The global batches (``batch_size * world`` examples, the last partial one dropped when
    ``world > 1`` so ranks stay in step) of one epoch; this rank's share of each (a strided slice)."""
    order = epoch_order(len(examples), seed, epoch)
    step = batch_size * world
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        if world > 1 and len(chunk) < step:
            return
        yield [examples[i] for i in chunk[rank::world]]


def split_validation(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) by a seeded shuffle; ``fraction`` in (0, 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fastlora: val_split must be in (0, 1), got {fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"{len(records)} records are too few to hold out {fraction:.0%} for validation")
    val = sorted(order[:n_val])
    keep = set(val)
    return [r for i, r in enumerate(records) if i not in keep], [records[i] for i in val]


# -- the embedded default -----------------------------------------------------------------------

_TOPICS = {
    "sports": (
        ["the striker", "our goalkeeper", "the coach", "the home team", "the tennis champion", "the sprinter",
         "the referee", "the league leaders", "the young midfielder", "the cycling team"],
        ["scored twice in", "was injured before", "celebrated after", "trained hard for", "lost narrowly in",
         "was sent off during", "broke the record at", "dominated"],
        ["the cup final", "the derby", "the marathon", "the championship match", "the season opener",
         "the world cup qualifier", "the grand slam semi-final", "the relay race"],
    ),
    "cooking": (
        ["the chef", "my grandmother", "the baker", "our neighbour", "the pastry cook", "the food critic",
         "the restaurant owner", "my flatmate", "the cookbook author", "the line cook"],
        ["slowly simmered", "baked", "seasoned", "grilled", "whisked together", "roasted", "tasted",
         "garnished"],
        ["the tomato sauce", "a loaf of sourdough bread", "the vegetable soup", "the garlic butter",
         "a chocolate cake", "the spicy curry", "the fresh pasta dough", "the lemon tart"],
    ),
    "technology": (
        ["the engineer", "the startup", "our IT department", "the chip maker", "the software developer",
         "the security researcher", "the phone company", "the data scientist", "the robotics lab",
         "the cloud provider"],
        ["released an update for", "found a bug in", "benchmarked", "rewrote", "patched",
         "open-sourced", "upgraded", "deployed"],
        ["the operating system", "the graphics driver", "the database server", "the mobile app",
         "the compiler", "the neural network", "the encryption library", "the web browser"],
    ),
    "weather": (
        ["the forecaster", "the weather service", "the coastal town", "the farmers", "the mountain village",
         "the airport", "the island", "the city council", "the sailors", "the ski resort"],
        ["warned about", "prepared for", "recorded", "was hit by", "expected", "reported", "braced for",
         "measured"],
        ["heavy rain overnight", "a powerful thunderstorm", "the first snowfall", "a long heatwave",
         "strong winds and hail", "thick morning fog", "a sudden frost", "record temperatures"],
    ),
}  # fmt: skip


def default_classification_data(n_train: int = 480, n_val: int = 160, seed: int = 1234) -> tuple[list, list]:
    """A generated 4-topic sentence classification set (sports / cooking / technology / weather):
    ``(train, val)`` lists of ``(line, {"text", "label"})``. Deterministic for a seed; train and
    validation sentences never coincide."""
    rng = random.Random(seed)
    topics = sorted(_TOPICS)
    seen: set[str] = set()
    records = []
    while len(records) < n_train + n_val:
        topic = topics[len(records) % len(topics)]
        subjects, verbs, objects = _TOPICS[topic]
        text = f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
        if text in seen:
            continue
        seen.add(text)
        records.append((len(records) + 1, {"text": text, "label": topic}))
    rng.shuffle(records)
    return records[:n_train], records[n_train:]
