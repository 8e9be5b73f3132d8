"""`tinylm prepare --dataset A --dataset B --weights 0.7,0.3`: several datasets mixed by weight.

Each dataset is opened as a single `--dataset` is (`documents.open_documents`, with the same
options), its rows cut to the text column and tagged with the dataset's index (`SOURCE_COLUMN`),
and the datasets are interleaved by `datasets.interleave_datasets`: each row comes from dataset i
with probability weight_i (the weights scaled to sum to 1), drawn by a generator seeded with
`MIX_SEED`, until one dataset runs out (`first_exhausted`). So the documents' shares match the
weights and no document is read twice; the rest of the other datasets is left out, and prepare
says how much. ("all_exhausted" would read every dataset to its end by repeating the ones that
run out: the shares would still follow the weights, but the same documents would be trained on
several times, and could land in both train and validation.)

Validation: when every dataset has its own validation split (`--val-split`, or a split named
"validation"), those splits, mixed by the same weights; otherwise `--val-fraction` of the mixed
rows, spread evenly, which holds each dataset in proportion to its weight.

One tokenizer is trained on the mix (or its first `--tokenizer-sample` characters), so every
dataset is encoded with the same one.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import pyarrow as pa

from . import documents
from .documents import SOURCE_COLUMN, Documents
from .errors import UserError

MIX_SEED = 0  # the generator that picks each row's dataset: the same flags give the same mix
STOPPING_STRATEGY = "first_exhausted"


def parse_weights(text: str | None, specs: list[str]) -> list[float]:
    """`--weights` ("0.7,0.3", or None: equal) as probabilities, one per `--dataset`, summing to 1."""
    if text is None:
        return [1 / len(specs)] * len(specs)
    items = [item.strip() for item in text.split(",")]
    example = ",".join(["1"] * len(specs))
    if len(items) != len(specs):
        raise UserError(f"--weights {text} gives {len(items)} weight(s) for {len(specs)} --dataset: give one "
                        f"number per --dataset, in the same order, e.g. --weights {example}")
    weights = []
    for item, spec in zip(items, specs):
        try:
            weight = float(item)
        except ValueError:
            raise UserError(f"--weights {text}: {item!r} (for {spec}) is not a number: give one number per "
                            f"--dataset, e.g. --weights {example}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UserError(f"--weights {text}: the weight of {spec} is {item}, but a weight must be a positive "
                            "number (the dataset's share of the documents): drop that --dataset to leave it "
                            "out, or give it a weight above 0")
        weights.append(weight)
    return [weight / sum(weights) for weight in weights]


def open_mix(specs: list[str], weights: list[float], *, val_split: str | None, val_fraction: float | None,
             default_val_fraction: float, **options) -> Documents:
    """The datasets `specs` as one `Documents`, their rows interleaved by `weights` (see the module's doc)."""
    parts = [documents.open_documents(spec, val_split=val_split, val_fraction=val_fraction,
                                      default_val_fraction=default_val_fraction, **options) for spec in specs]
    named = [part.val is not None for part in parts]
    if any(named) and not all(named):  # only the "validation" split found by default can be missing in some
        lacking = ", ".join(part.spec for part in parts if part.val is None)
        print(f"note: {lacking} has no validation split, so validation is {default_val_fraction:.0%} of the mixed "
              "documents, from every dataset (pass --val-fraction to choose another share)")
        for part in parts:
            part.val = None
    column = parts[0].column
    train = interleave([part.train for part in parts], weights, parts)
    val = interleave([part.val for part in parts], weights, parts) if all(named) else None
    first = parts[0].record
    record = {
        "datasets": [{"dataset": part.spec, "weight": weight, "num_rows": part.num_rows()}
                     for part, weight in zip(parts, weights)],
        "config_name": first["config_name"], "split": first["split"], "text_column": column,
        "val_split": first["val_split"] if all(named) else None,
        "val_fraction": None if all(named) else val_fraction or default_val_fraction,
        "streaming": first["streaming"], "mix_seed": MIX_SEED, "stopping_strategy": STOPPING_STRATEGY,
    }
    return Documents(" + ".join(specs), train, val, column, record)


def interleave(splits: list, weights: list[float], parts: list[Documents]):
    """One split of every dataset, each row tagged with its dataset's index, interleaved by `weights`."""
    tagged = [tag(split, index, part) for index, (split, part) in enumerate(zip(splits, parts))]
    if isinstance(tagged[0], datasets.Dataset):
        tagged = same_text_type(tagged, parts[0].column)
    return datasets.interleave_datasets(tagged, probabilities=weights, seed=MIX_SEED,
                                        stopping_strategy=STOPPING_STRATEGY)


def tag(split, index: int, part: Documents):
    """A split's text column and SOURCE_COLUMN = `index`.

    A `Dataset` gets both without a copy (a column selected, one added in memory: 2 bytes a row);
    a stream maps each batch as it is read, checking the text column (a stream may not know its
    columns up front) with the dataset's name in the message.
    """
    if isinstance(split, datasets.Dataset):
        return split.select_columns([part.column]).add_column(SOURCE_COLUMN, np.full(split.num_rows, index, np.int16))

    def tagged(batch: pa.Table) -> pa.Table:
        texts = documents.column_of(batch, part.column, part.spec).cast(pa.large_string())
        return pa.table({part.column: texts, SOURCE_COLUMN: pa.array(np.full(batch.num_rows, index, np.int16))})

    features = datasets.Features({part.column: datasets.Value("large_string"), SOURCE_COLUMN: datasets.Value("int16")})
    return split.with_format("arrow").map(tagged, batched=True, batch_size=documents.MAP_BATCH, features=features)


def same_text_type(splits: list[datasets.Dataset], column: str) -> list[datasets.Dataset]:
    """`interleave_datasets` needs one type per column: when the datasets' texts are Arrow strings and large
    strings (pandas writes the latter), cast the strings to large strings (a copy in the datasets cache)."""
    large = datasets.Value("large_string")
    if all(split.features[column] == splits[0].features[column] for split in splits):
        return splits
    return [split if split.features[column] == large else split.cast_column(column, large) for split in splits]


class Tally:
    """What each dataset of a mix gave each split: rows read, documents and tokens."""

    def __init__(self, count: int):
        self.counts = {what: {split: np.zeros(count, np.int64) for split in ("train", "val")}
                       for what in ("rows", "documents", "tokens")}

    def add(self, split: str, rows: pa.Table) -> None:
        """Count a batch of tokenized rows (`input_ids` and SOURCE_COLUMN) written to `split`."""
        sources = rows.column(SOURCE_COLUMN).to_numpy()
        lengths = rows.column("input_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
        size = len(self.counts["rows"][split])
        for what, weights in (("rows", None), ("documents", lengths > 0), ("tokens", lengths)):
            self.counts[what][split] += np.bincount(sources, weights, minlength=size).astype(np.int64)

    def record(self, mixed: list[dict]) -> list[dict]:
        """meta.json's `source.datasets`: each entry of `mixed` with its counts and its shares of the whole mix
        (train and val together)."""
        totals = {what: sum(int(split.sum()) for split in self.counts[what].values())
                  for what in ("documents", "tokens")}
        entries = []
        for index, entry in enumerate(mixed):
            counts = {what: {split: int(values[index]) for split, values in self.counts[what].items()}
                      for what in ("documents", "tokens")}
            rows_read = sum(int(values[index]) for values in self.counts["rows"].values())
            share = {what: sum(counts[what].values()) / totals[what] if totals[what] else 0.0
                     for what in ("documents", "tokens")}
            entries.append({**entry, "rows_read": rows_read, "num_documents": counts["documents"],
                            "num_tokens": counts["tokens"], "share": share})
        return entries

