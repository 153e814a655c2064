"""Text-classification data for fine-tuning runs: reading, few-shot sampling, batching.

Files are TSV, CSV or JSONL with a text column (``sentence`` by default) and an integer
``label`` column. A name that is not an existing file is treated as a Hugging Face
``datasets`` identifier ("glue/sst2", optionally with ":split"), which needs the
``datasets`` package and a reachable hub.

Few-shot protocol (MeZO / Bilevel-ZOFO): draw ``num_train`` examples from the training file
with a seed; for Bilevel-ZOFO split them into a lower-level set D_g and an upper-level set
D_f (2 : 1 by default).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

@dataclasses.dataclass
class Example:
    text: str
    label: int


class DataError(ValueError):
    """A data file or source is missing or malformed; the message says what and where."""


def _rows_delimited(path: Path, delimiter: str) -> Tuple[List[str], List[dict]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark
        # SST-2 sentences contain quote characters; TSV files are read without quoting.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None:
            raise DataError(f"{path}: the file is empty (expected a header line)")
        return list(reader.fieldnames), list(reader)


def _rows_jsonl(path: Path) -> Tuple[List[str], List[dict]]:
    rows, columns = [], []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object")
            for key in row:
                if key not in columns:
                    columns.append(key)
            rows.append(row)
    return columns, rows


def _rows_hub(name: str) -> Tuple[List[str], List[dict], str]:
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError:
        raise DataError(
            f"{name!r} is not an existing file, and reading it as a datasets name needs the "
            "'datasets' package (pip install datasets)") from None
    spec, _, split = name.partition(":")
    parts = spec.split("/")
    try:
        if len(parts) == 2 and parts[0] == "glue":
            ds = datasets.load_dataset("glue", parts[1], split=split or "train")
        else:
            ds = datasets.load_dataset(spec, split=split or "train")
    except Exception as exc:  # network errors, unknown names: report both possibilities
        raise DataError(
            f"{name!r} is not an existing file and could not be loaded as a datasets name: "
            f"{exc}") from None
    return list(ds.column_names), [dict(r) for r in ds], spec


def _rows_of_file(path: Path) -> Tuple[List[str], List[dict]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".tab"):
            return _rows_delimited(path, "\t")
        if suffix == ".csv":
            return _rows_delimited(path, ",")
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _rows_jsonl(path)
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {bad!r}); save the file "
                        "as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    raise DataError(f"{path}: unknown file type {suffix!r}; use .tsv, .csv or .jsonl")


def read_examples(source, text_column: str = "sentence", label_column: str = "label",
                  limit: Optional[int] = None) -> List[Example]:
    """Read (text, label) examples from a TSV/CSV/JSONL file or a datasets name."""
    source = str(source)
    path = Path(source)
    if path.is_file():
        columns, rows = _rows_of_file(path)
        where = str(path)
    elif path.exists():
        raise DataError(f"{path} is a directory, not a data file")
    elif (path.suffix.lower() in (".tsv", ".tab", ".csv", ".jsonl", ".json", ".ndjson")
          or source.startswith((".", os.sep, "~"))
          or (path.parent != Path(".") and path.parent.exists())):
        raise DataError(f"data file not found: {path}")
    else:
        columns, rows, where = _rows_hub(source)
    for col in (text_column, label_column):
        if col not in columns:
            raise DataError(
                f"{where}: no column {col!r} (columns: {', '.join(map(str, columns)) or 'none'})")
    out = []
    for n, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: row {n + 1} has no {text_column!r} or {label_column!r}")
        try:
            label_int = int(label)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: row {n + 1}: label {label!r} is not an integer class id") from None
        if label_int < 0:
            raise DataError(f"{where}: row {n + 1}: negative label {label_int}")
        out.append(Example(str(text), label_int))
    if not out:
        raise DataError(f"{where}: no examples")
    return out


def num_labels(*example_sets: Sequence[Example]) -> int:
    return max(e.label for s in example_sets for e in s) + 1


def sample(examples: Sequence[Example], n: int, seed: int) -> List[Example]:
    """``n`` examples drawn without replacement with ``seed`` (all of them, shuffled, if n
    is at least the number available)."""
    if n <= 0:
        raise ValueError(f"number of examples must be positive, got {n}")
    if n > len(examples):
        raise DataError(f"asked for {n} examples but the source has only {len(examples)}")
    rng = random.Random(seed)
    idx = rng.sample(range(len(examples)), n)
    return [examples[i] for i in idx]


def split(examples: Sequence[Example], upper_fraction: float) -> Tuple[List[Example], List[Example]]:
    """(lower, upper): the last ``upper_fraction`` of the (already shuffled) sample is the
    upper-level set D_f, the rest the lower-level set D_g."""
    if not 0.0 < upper_fraction < 1.0:
        raise ValueError(f"upper_fraction must be in (0, 1), got {upper_fraction}")
    n_upper = max(1, int(round(len(examples) * upper_fraction)))
    if n_upper >= len(examples):
        raise DataError(f"{len(examples)} examples are too few to split into lower/upper sets")
    return list(examples[:-n_upper]), list(examples[-n_upper:])


class Encoded:
    """Tokenised examples kept as padded tensors (short texts: padding to the longest in
    the set is cheap and makes every batch the same shape, so step times are comparable)."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int,
                 add_special_tokens: bool = True):
        enc = tokenizer([e.text for e in examples], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt",
                        add_special_tokens=add_special_tokens)
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.labels = torch.tensor([e.label for e in examples], dtype=torch.long)

    def __len__(self) -> int:
        return self.labels.numel()

    def batch(self, idx, trim: bool = True) -> dict:
        """The examples at ``idx``; with ``trim``, columns that are padding in every row are
        dropped (right padding), so short batches run faster."""
        ids, mask = self.input_ids[idx], self.attention_mask[idx]
        if trim and mask.numel():
            width = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :width].contiguous(), mask[:, :width].contiguous()
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Sequential batches (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size))


class BatchStream:
    """Endless shuffled batches of ``batch_size`` (a new permutation per epoch, from a seed)."""

    def __init__(self, data: Encoded, batch_size: int, seed: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.gen = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._pos + self.batch_size > self._perm.numel():
            self._perm = torch.randperm(len(self.data), generator=self.gen)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.data.batch(idx)


def random_batch(vocab_size: int, batch_size: int, seq_len: int, num_labels: int = 2,
                 seed: int = 0, pad_token_id: Optional[int] = None) -> dict:
    """A synthetic batch (benchmarks need shapes, not meaning). Avoids the pad token so
    every position is attended."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = pad_token_id + 1 if pad_token_id + 1 < vocab_size else 5
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=g)}
