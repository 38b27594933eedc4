"""Text in, padded arrays out: loading rows through `datasets`, tokenising, masks, batches.

Shapes: prompts for generation are left-padded `[B, P]`; training sequences are right-padded
`[B, T]` with a `loss_mask` that is 1 on the tokens to learn (the response, plus its EOS).
"""

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxrlhf.config import DataConfig
from jaxrlhf.errors import ConfigError

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(data: DataConfig, text: tuple[str, ...], numbers: tuple[str, ...] = (),
              every_column: bool = False) -> list[dict[str, Any]]:
    """Rows with our column names, from a local file or a hub dataset: the `text` columns
    hold strings and the `numbers` columns finite numbers in every row used, else an error
    naming the file, the row (counted from 1 in file order; a CSV header is no row) and the
    column. With `every_column` a row also holds the data's other columns, under their names
    (what a reward function gets beside the prompts)."""
    return _rows(data, _open(data), text, numbers, every_column)


def load_rows_of_a_form(data: DataConfig, forms: dict[str, tuple[str, ...]]) -> tuple[str, list[dict[str, Any]]]:
    """(form, rows) for the first of `forms` (name -> its text columns, in order of preference)
    whose columns the data holds all of and which holds no column of an earlier form (a file
    with `text` and `prompt` is neither prompt/response nor plain text), read as `load_rows`
    reads them. None fits: an error naming the columns the nearest form misses."""
    dataset = _open(data)
    have = set(dataset.column_names)
    theirs = {name: [data.columns.get(c, c) for c in cols] for name, cols in forms.items()}
    earlier: set[str] = set()
    for name, cols in theirs.items():
        if set(cols) <= have and not (earlier - set(cols)) & have:
            return name, _rows(data, dataset, forms[name])
        earlier |= set(cols)
    nearest = max(theirs, key=lambda n: len(set(theirs[n]) & have))  # the first, on a tie
    absent = [c for c in theirs[nearest] if c not in have]
    if not absent:  # all there, but mixed with an earlier form's columns
        absent = [c for c in earlier - set(theirs[nearest]) if c in have]
        raise ConfigError(f"{data.path}: it has {dataset.column_names}: both {'+'.join(theirs[nearest])} "
                          f"({nearest}) and {absent}; keep one form's columns (or map them with data.columns)")
    wanted = " or ".join(f"{'+'.join(c)} ({n})" for n, c in theirs.items())
    raise ConfigError(f"{data.path}: column(s) {absent} not found; it has {dataset.column_names} (it needs "
                      f"{wanted}; map ours to yours with data.columns)")


def _open(data: DataConfig):
    """The dataset `data` names: a local file (checked first, see `_check_file`) or a hub dataset."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    path = Path(data.path).expanduser()
    local = path.suffix in _FORMATS or path.exists() or data.path.startswith((".", "/", "~"))
    if not local:
        try:
            return datasets.load_dataset(data.path, split=data.split)
        except Exception as e:
            raise ConfigError(f"cannot load dataset {data.path!r} (split {data.split!r}): {e}") from e
    _check_file(path)
    # A local file parses in moments: no bars; and datasets' own log of a parser error would be
    # a second line beside the one error below that names the file and the cause.
    bars, verbosity = not datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    if bars:
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(_FORMATS.get(path.suffix, "json"), data_files=str(path), split="train")
    except Exception as e:  # datasets wraps the parser's error, which says what is wrong
        cause = (e.__cause__ or e.__context__ or e) if isinstance(e, DatasetGenerationError) else e
        raise ConfigError(f"cannot read data file {path}: {type(cause).__name__}: {cause}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _rows(data: DataConfig, dataset, text: tuple[str, ...], numbers: tuple[str, ...] = (),
          every_column: bool = False) -> list[dict[str, Any]]:
    columns = {ours: data.columns.get(ours, ours) for ours in (*text, *numbers)}
    absent = [theirs for theirs in columns.values() if theirs not in dataset.column_names]
    if absent:
        raise ConfigError(f"{data.path}: column(s) {absent} not found; it has {dataset.column_names} "
                          f"(map ours to yours with data.columns)")
    others = [c for c in dataset.column_names if every_column and c not in {*columns, *columns.values()}]
    end = len(dataset) if data.max_rows is None else min(len(dataset), data.skip_rows + data.max_rows)
    rows = [{**{c: row[c] for c in others}, **{ours: row[theirs] for ours, theirs in columns.items()}}
            for row in (dataset[i] for i in range(data.skip_rows, end))]
    if not rows:
        raise ConfigError(f"{data.path}: no rows to use (it has {len(dataset)}; skip_rows={data.skip_rows})")
    for number, row in enumerate(rows, data.skip_rows + 1):
        for ours in text:
            if not isinstance(row[ours], str):
                raise ConfigError(f"{data.path}: row {number}, column {columns[ours]!r}: expected text, got "
                                  f"{_shown(row[ours])}")
        for ours in numbers:
            value = row[ours]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{data.path}: row {number}, column {columns[ours]!r}: expected a finite "
                                  f"number, got {_shown(value)}")
    return rows


def _shown(value) -> str:
    return "nothing (a missing or null value)" if value is None else repr(value)


def _check_file(path: Path) -> None:
    """A local data file exists, is not empty, and (text formats) is UTF-8; a JSONL file holds
    one JSON object per line. Errors name the file and the line."""
    if path.is_dir():
        raise ConfigError(f"data file {path} is a folder; name a .json, .jsonl, .csv or .parquet file")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"data file {path} is empty")
    if path.suffix == ".parquet":
        return
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    if path.suffix != ".jsonl":
        return
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object, not {type(row).__name__}")


def set_pad_token(tokenizer, pad_token: str | None, where, key: str = "pad_token") -> None:
    """Give `tokenizer` (of `where`) the token batches are padded with: `pad_token` (the
    config's `key`, named in errors) when set
    (a token of its vocabulary: a new one would have no row in the model's embedding), else
    its own pad token, else its EOS, as TRL pads GPT-2 (the stock tokenizer has no pad token).
    Which id pads never matters to the math: every mask comes from lengths and the sampler's
    done flags, never from comparing ids with pad."""
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ConfigError(f"{key}={pad_token!r} is not a token of the tokenizer of {where}; name one of "
                              f"its tokens (e.g. its EOS {tokenizer.eos_token!r}), or null for its own")
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"the tokenizer of {where} has no pad token and no EOS to pad with; set {key} to one "
                          "of its tokens")


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list[str], max_tokens: int, length_range=None, seed: int = 0,
                   pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Left-padded prompt `input_ids` and `attention_mask` `[B, P]`, P the longest prompt (or
    `pad_to`), and `cut` `[B]` marking the prompts longer than `max_tokens`, which keep their
    last `max_tokens` tokens (the part next to the reply). With `length_range` each prompt is
    first cut to its first L tokens, L drawn uniformly from the range (deterministic in `seed`;
    on purpose, so not marked)."""
    rng = np.random.default_rng(seed)
    rows = []
    for ids in _ids(tokenizer, prompts):
        if length_range is not None:
            ids = ids[: rng.integers(length_range[0], length_range[1] + 1)]
        rows.append(ids)
    cut = np.asarray([len(ids) > max_tokens for ids in rows], bool)
    rows = [ids[-max_tokens:] for ids in rows]
    width = pad_to or max(len(r) for r in rows)
    out = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, ids in enumerate(rows):
        if ids:
            out[i, width - len(ids):] = ids
            mask[i, width - len(ids):] = 1
    return {"input_ids": out, "attention_mask": mask, "cut": cut}


def encode_pairs_of_text(tokenizer, prompts, responses, max_length: int, completion_only: bool = True,
                         source: DataConfig | None = None):
    """prompt + response + EOS, right-padded to `max_length` -> input_ids, attention_mask,
    loss_mask `[B, T]` (loss on the response and EOS; on everything if not completion_only),
    and `cut` `[B]`. A response too long to fit loses the end of its body but keeps its EOS,
    so the model still learns to stop (`cut` marks those rows); a prompt that leaves no room
    for the EOS is an error naming its row as `load_rows` does (the rows read from `source`)."""
    eos = tokenizer.eos_token_id
    prompt_ids, response_ids = _ids(tokenizer, prompts), _ids(tokenizer, responses)
    ids = np.full((len(prompts), max_length), tokenizer.pad_token_id, np.int32)
    attn, loss = np.zeros_like(ids), np.zeros_like(ids)
    cut = np.zeros(len(prompts), bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) >= max_length:
            where = f"row {i + 1}" if source is None else f"{source.path}: row {source.skip_rows + i + 1}"
            raise ConfigError(f"{where}: the prompt has {len(p)} tokens, leaving no room for a response "
                              f"within max_length={max_length}")
        body = r[: max_length - len(p) - 1]
        cut[i] = len(body) < len(r)
        r = body + [eos]
        ids[i, : len(p) + len(r)] = p + r
        attn[i, : len(p) + len(r)] = 1
        loss[i, 0 if not completion_only else len(p): len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "cut": cut}


def encode_texts(tokenizer, texts: list[str], max_length: int, keep: str = "start") -> dict[str, np.ndarray]:
    """Right-padded encoder inputs (with the tokenizer's [CLS]/[SEP]) `[B, T]`, and `cut` `[B]`
    marking the texts longer than `max_length`, which keep their start or (`keep="end"`, for
    prompt + response, whose response is at the end) their end."""
    texts = list(texts)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = {"start": "right", "end": "left"}[keep]
    try:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    finally:
        tokenizer.truncation_side = side
    cut = np.asarray([len(ids) > max_length for ids in tokenizer(texts)["input_ids"]], bool)
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "cut": cut}


def warn_cut(cut_B: np.ndarray, what: str) -> None:
    """One warning with the count of rows cut to fit (`what` says which and to what)."""
    if cut_B.any():
        warnings.warn(f"{int(cut_B.sum())} of {len(cut_B)} {what}", stacklevel=2)


def check_batch(n_rows: int, batch_size: int) -> None:
    if batch_size > n_rows:
        raise ConfigError(f"batch_size={batch_size} is larger than the {n_rows} rows of data")


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The rows of batch `step`: epochs of fresh permutations (seeded by epoch), incomplete
    tail batches dropped. Pure in `step`, so a resumed run sees the same data order."""
    check_batch(n_rows, batch_size)
    per_epoch = n_rows // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return order[offset * batch_size: (offset + 1) * batch_size]


def take(arrays: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in arrays.items()}
