"""One interface over every reward: `scorer(prompts, responses, rows) -> float32 [B]`, the
weighted sum of a `reward:` entry's sources (TRL's `reward_weights`), each source's own
scores kept apart for its metrics `rewards/<name>/mean|std`.

Sources: a reward model we trained (BERT / DistilBERT regression head), any Hugging Face
sequence classifier (the logit of a chosen label), or a Python function named explicitly as
`module:function` (the only code a config may import), which also gets the prompt rows' other
columns. Model scorers read text, so the policy's tokenizer and the scorer's may differ:
responses are decoded, then re-encoded.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import numbers
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxrlhf import diagnostics, parallel
from jaxrlhf.config import Reward, RewardSource
from jaxrlhf.data import encode_texts, set_pad_token, warn_cut
from jaxrlhf.errors import CheckpointError, ConfigError, JaxRLHFError, first_line
from jaxrlhf.models import frozen_params, load_pretrained, load_tokenizer

# One source: (prompts [B], responses [B], rows [B] or None) -> float32 [B], NaN where it does not apply.
SourceScorer = Callable[..., np.ndarray]


def _texts(source: RewardSource, prompts, responses) -> list[str]:
    return list(responses) if source.text == "response" else [p + r for p, r in zip(prompts, responses)]


def model_scorer(source: RewardSource, mesh, key: str = "reward", dtype: str = "float32") -> SourceScorer:
    """Score with a classification checkpoint: column `label` (name or index) of its logits,
    computed in `dtype`, its params stored in it. Each device of `mesh` scores its share of
    every chunk of `source.batch_size` texts (rounded up to a multiple of the devices). `key`
    is the source's place in the config, for errors."""
    try:
        with parallel.on_host():  # the whole model is built on the host, then laid out on the mesh
            module, params, config = load_pretrained(source.model, head="classification", dtype=dtype)
    except CheckpointError as e:  # e.g. a causal LM: no classification head
        raise CheckpointError(f"{key}.model={source.model}: {e}") from None
    tokenizer = load_tokenizer(source.model, config)
    set_pad_token(tokenizer, source.pad_token, source.model, key="the reward source's pad_token")
    labels = list(config.id2label)
    label = 0 if source.label is None else source.label
    if isinstance(label, str):
        if label not in labels:
            raise ConfigError(f"reward label {label!r} is not one of {source.model}'s labels {labels}")
        label = labels.index(label)
    if not 0 <= label < len(labels):
        raise ConfigError(f"reward label index {label} is out of range for {len(labels)} labels")
    forward = classifier_forward(module, label)
    params = parallel.put_state(frozen_params(params, dtype), mesh)
    chunk_size = parallel.whole_rows(source.batch_size, mesh)

    # prompt + response too long for the scorer keeps its end: the response the score is about.
    keep = "start" if source.text == "response" else "end"
    warned = False

    def score(prompts: list[str], responses: list[str], rows=None) -> np.ndarray:
        nonlocal warned
        texts = _texts(source, prompts, responses)
        out, cut = [], []
        for start in range(0, len(texts), chunk_size):
            chunk = texts[start: start + chunk_size]
            pad = chunk_size - len(chunk)  # one compiled shape for every chunk
            enc = encode_texts(tokenizer, chunk + [""] * pad, source.max_length, keep=keep)
            ids, mask = parallel.put_rows((enc["input_ids"], enc["attention_mask"]), mesh)
            out.append(parallel.gather(forward(params, ids, mask))[: len(chunk)])
            cut.append(enc["cut"][: len(chunk)])
        if not warned and np.concatenate(cut).any():  # once per scorer: it runs every PPO step
            warned = True
            warn_cut(np.concatenate(cut), f"texts cut to the reward model's max_length={source.max_length} "
                                          f"(their {keep} kept); later cuts are not reported")
        return np.concatenate(out).astype(np.float32)

    return score


def classifier_forward(module, label: int = 0):
    """The compiled score of a classification model: (params, ids `[B, T]`, mask `[B, T]`) ->
    its logit `label` `[B]`, on whatever mesh the arguments are laid out on."""
    return jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask)[:, label])


def score_rows(forward, params, ids_BxT: np.ndarray, mask_BxT: np.ndarray, mesh, batch_size: int) -> np.ndarray:
    """`forward` (see `classifier_forward`) over host arrays of encoded rows, in chunks of
    `batch_size` rows (rounded up to whole rows per device; the last chunk filled with earlier
    rows, so one compiled shape), each device scoring its share -> float32 `[B]`."""
    n, chunk = len(ids_BxT), parallel.whole_rows(batch_size, mesh)
    out = []
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk) % n
        ids, mask = parallel.put_rows((ids_BxT[idx], mask_BxT[idx]), mesh)
        out.append(parallel.gather(forward(params, ids, mask)))
    return np.concatenate(out)[:n].astype(np.float32)


def function_scorer(source: RewardSource) -> SourceScorer:
    """A Python function's scores. As TRL calls reward functions: every column of the prompt
    rows but `prompt` comes as a keyword argument (a list aligned with the responses), to a
    function that takes `**kwargs` or names the column; a function whose parameters name
    `completions` is called by keyword (`prompts=`, `completions=`), any other positionally
    (prompts, responses). Conversational rows (`prompt` a list of messages) give it those
    messages as prompts and each response as `[{"role": "assistant", "content": text}]`; plain
    rows the prompt texts the policy saw and the response texts. None for a response (TRL: not
    applicable) scores NaN. TRL's `completion_ids` and `trainer_state` are not passed."""
    module_name, _, name = source.function.rpartition(":")
    try:
        fn = getattr(_import(module_name), name)
    except (ImportError, AttributeError, OSError) as e:
        raise ConfigError(f"reward function {source.function!r} cannot be imported: {e} (a module is looked for "
                          "on the Python path, then as a .py file in the working directory and beside the "
                          "config file)") from None
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): (prompts, responses) alone
        params = {}
    by_keyword = "completions" in params
    texts = {"prompts", "completions"} if by_keyword else set(list(params)[:2])
    every = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    needed = [n for n, p in params.items() if n not in texts and p.default is inspect.Parameter.empty
              and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]

    def columns(rows) -> dict[str, list]:
        have = [c for c in (rows[0] if rows else {}) if c != "prompt" and c not in texts]
        absent = [n for n in needed if n not in have]
        if absent:
            raise JaxRLHFError(f"reward function {source.function} needs column(s) {absent}, which the prompt rows "
                               f"lack (they have {sorted(rows[0]) if rows else []})")
        return {c: [r[c] for r in rows] for c in have if every or c in params}

    def score(prompts: list[str], responses: list[str], rows=None) -> np.ndarray:
        kwargs = columns(rows)
        prompts, responses = list(prompts), list(responses)
        if rows and isinstance(rows[0].get("prompt"), list):  # conversational, as TRL passes it
            prompts = [r["prompt"] for r in rows]
            responses = [[{"role": "assistant", "content": text}] for text in responses]
        try:
            values = (fn(prompts=prompts, completions=responses, **kwargs) if by_keyword
                      else fn(prompts, responses, **kwargs))
        except Exception as e:
            raise JaxRLHFError(f"reward function {source.function} raised {type(e).__name__}: {first_line(e)}") from e
        return _checked_scores(values, len(responses), source.function)

    score.check_columns = columns  # what a preflight runs on the prompt rows
    return score


def _checked_scores(values, n: int, name: str) -> np.ndarray:
    """What reward function `name` returned for `n` responses, as float32 `[n]`, NaN where it
    returned None (TRL: not applicable), a bool as 1 or 0 (as TRL's float tensor of them); else
    an error saying what is wrong: None, not numbers (a numeric string too), the wrong count, or
    a score that is not finite."""
    must = "it must return one number per response (None where it does not apply), in a list or array"
    if values is None:
        raise JaxRLHFError(f"reward function {name} returned None; {must}")
    rows = values.tolist() if isinstance(values, np.ndarray) else values
    if isinstance(rows, (list, tuple)):
        # NumPy would read "1.0" as 1.0; TRL's torch.tensor refuses it, and so do we
        wrong = next((i for i, v in enumerate(rows)
                      if v is not None and not isinstance(v, (numbers.Real, np.bool_))), None)
        if wrong is not None:
            raise JaxRLHFError(f"reward function {name} returned {_shown(rows[wrong])} for response {wrong + 1} "
                               f"(counted from 1); {must}")
        values = [np.nan if v is None else v for v in rows]
    try:
        scores = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise JaxRLHFError(f"reward function {name} returned {_shown(values)}; {must}") from None
    if scores.shape[0] != n:
        raise JaxRLHFError(f"reward function {name} returned {scores.shape[0]} scores for {n} responses")
    flat = isinstance(rows, (list, tuple)) and len(rows) == n
    given = np.array([v is not None for v in rows]) if flat else np.ones(n, bool)
    bad = np.flatnonzero(given & ~np.isfinite(scores))
    if bad.size:
        raise JaxRLHFError(f"reward function {name} returned a non-finite score for {bad.size} of {n} responses "
                           f"(the first: response {bad[0] + 1}, counted from 1: {scores[bad[0]]}); return None for "
                           "a response it does not apply to")
    return scores


def _shown(values, most: int = 60) -> str:
    text = repr(values)
    return f"a {type(values).__name__} {text[:most]}{'...' if len(text) > most else ''}"


def _import(module: str):
    """A module by name, or by the path of its .py file."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(Path(module).stem, module)
    if spec is None or not Path(module).is_file():
        raise ImportError(f"no file {module}")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def penalise_missing_eos(scores_B: np.ndarray, rollout, eos_ids: tuple[int, ...], penalty: float) -> np.ndarray:
    """TRL's `missing_eos_penalty`: `penalty` off the score of each rollout whose response
    (`rollout.sequences` after the prompt, `[B, N]`, real where `rollout.response_mask`) holds
    none of the `eos_ids` (the sampler's `SamplingConfig.eos_ids`), i.e. was cut at max_new_tokens."""
    return np.where(replies_ended(rollout, eos_ids), scores_B, scores_B - penalty).astype(np.float32)


def replies_ended(rollout, eos_ids: tuple[int, ...]) -> np.ndarray:
    """Whether each rollout's response (`rollout.sequences` after the prompt, `[B, N]`, real
    where `rollout.response_mask`) holds any of the `eos_ids` -> bool `[B]`."""
    response_BxN = np.asarray(rollout.sequences)[:, -rollout.response_mask.shape[1]:]
    return (np.isin(response_BxN, eos_ids) & (np.asarray(rollout.response_mask) == 1)).any(-1)


def reward_sources(reward: Reward) -> tuple[RewardSource, ...]:
    """The sources of a `reward:` entry, one or a list, as a tuple."""
    return (reward,) if isinstance(reward, RewardSource) else tuple(reward)


def reward_models(reward: Reward) -> tuple[str, ...]:
    """The checkpoints a `reward:` entry reads (its model sources'), for the output checks."""
    return tuple(s.model for s in reward_sources(reward) if s.model is not None)


def describe_reward(reward: Reward) -> str:
    """A `reward:` entry in a plan line: each source's model or function, with its weight when not 1."""
    return " + ".join(f"{s.weight:g} x {s.model or s.function}" if s.weight != 1 else (s.model or s.function)
                      for s in reward_sources(reward))


def source_names(sources: tuple[RewardSource, ...]) -> list[str]:
    """Each source's metric name: its `name`, else (as TRL names them) the function's name or
    the model's folder name, numbered `_2`, `_3`... where it would repeat one before it."""
    given = [s.name for s in sources if s.name is not None]
    if len(set(given)) < len(given):
        raise ConfigError(f"reward source names {given} repeat; give each source its own name")
    names: list[str] = []
    for s in sources:
        base = s.name or (s.function.rpartition(":")[2] if s.function else Path(s.model.rstrip("/")).name)
        name, n = base, 1
        while s.name is None and (name in names or name in given):
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


class Scorer:
    """Every source of a `reward:` entry (one, or a weighted list): `scorer(prompts, responses,
    rows)` -> the weighted total, float32 `[B]`; `by_source` -> each source's scores. `rows`
    (optional) are the responses' prompt rows, every column, aligned with the responses: a
    function source gets their columns (see `function_scorer`)."""

    def __init__(self, parts: dict[str, tuple[float, SourceScorer]]):
        self.parts = parts  # name -> (weight, the source's scorer)

    def by_source(self, prompts, responses, rows=None) -> dict[str, np.ndarray]:
        """name -> float32 `[B]`, NaN where a function returned None; with TRL's warning when
        every source returned None for a response (see `total` for its score)."""
        scores = {name: score(prompts, responses, rows) for name, (_, score) in self.parts.items()}
        none_B = unscorable(scores)
        if none_B.any():
            i = int(np.argmax(none_B))
            row = {k: v for k, v in (rows[i] if rows else {}).items() if k != "prompt"}
            warnings.warn(f"every reward source returned None for {int(none_B.sum())} of {len(none_B)} responses; "
                          f"the first: prompt {prompts[i]!r}, response {responses[i]!r}, columns {row}; make sure "
                          "at least one source scores each response", stacklevel=2)
        return scores

    def total(self, scores: dict[str, np.ndarray], unscored: float = 0.0) -> np.ndarray:
        """The weighted sum of `by_source`'s scores, NaN (None) counting 0, as TRL's nansum ->
        float32 `[B]`; `unscored` for a response every source returned None for: 0 (the
        nansum's), or NaN for GRPO and RLOO, which leave it out of its group (as TRL's)."""
        total = weighted_total(scores, {name: weight for name, (weight, _) in self.parts.items()})
        return np.where(unscorable(scores), np.float32(unscored), total)

    def __call__(self, prompts, responses, rows=None) -> np.ndarray:
        return self.total(self.by_source(prompts, responses, rows))

    def check_columns(self, rows) -> None:
        """Every function source finds the columns it names in `rows` (a preflight's check)."""
        for _, score in self.parts.values():
            getattr(score, "check_columns", lambda rows: None)(rows)


def score_columns(scorers: dict[str, Scorer], prompts, responses, rows=None) -> dict[str, np.ndarray]:
    """An evaluation's scores: each scorer's total under its name and, for a scorer of several
    sources, each source's scores (NaN where not applicable) under `scorer/source`."""
    columns = {}
    for name, scorer in scorers.items():
        by_source = scorer.by_source(prompts, responses, rows)
        columns[name] = scorer.total(by_source)
        if len(by_source) > 1:
            columns |= {f"{name}/{source}": v for source, v in by_source.items()}
    return columns


def unscorable(scores: dict[str, np.ndarray]) -> np.ndarray:
    """Whether every source returned None (NaN) for each response -> bool `[B]`."""
    return np.isnan(np.stack(list(scores.values()))).all(0)


def weighted_total(scores: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """sum over sources of weight x scores `[B]`, a NaN term counting 0 (TRL's nansum) -> float32 `[B]`."""
    return np.nansum(np.stack([scores[n] * np.float32(weights[n]) for n in scores]), axis=0).astype(np.float32)


def source_metrics(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """TRL's `rewards/<name>/mean` and `rewards/<name>/std` of each source's scores over the
    batch, NaN-aware (a None response is left out; std with Bessel's correction, as TRL's
    nanstd; NaN when under 2 responses count)."""
    out = {}
    for name, v in scores.items():
        out[f"rewards/{name}/mean"], out[f"rewards/{name}/std"], _ = diagnostics.mean_and_std(v)
    return out


def make_scorer(reward: Reward, mesh, key: str = "reward", dtype: str = "float32") -> SourceScorer:
    """The scorer of a `reward:` entry (at `key` in the config, for errors): each model source
    runs on `mesh` in compute `dtype` (a function runs in every process on all rows, so every
    process holds every score)."""
    sources = reward_sources(reward)
    if not sources:
        raise ConfigError(f"{key} lists no reward source")
    parts = {}
    for i, (name, s) in enumerate(zip(source_names(sources), sources)):
        where = key if isinstance(reward, RewardSource) else f"{key}[{i}]"
        parts[name] = (s.weight, model_scorer(s, mesh, where, dtype) if s.model is not None else function_scorer(s))
    return Scorer(parts)


def locate_reward_functions(config, config_dir: Path | None):
    """`config` with each reward source's `module:function` found the way users expect: from the
    Python path, else as `module.py` in the working directory or beside the config file
    (`config_dir`), which is then named by its full path (so config.json records the file used)."""
    if isinstance(config, RewardSource):
        return _located(config, config_dir)
    if isinstance(config, dict):
        return {k: locate_reward_functions(v, config_dir) for k, v in config.items()}
    if isinstance(config, tuple) and any(isinstance(v, RewardSource) for v in config):
        return tuple(locate_reward_functions(v, config_dir) for v in config)
    if dataclasses.is_dataclass(config):
        changes = {f.name: locate_reward_functions(getattr(config, f.name), config_dir)
                   for f in dataclasses.fields(config)}
        return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not getattr(config, k)})
    return config


def _located(source: RewardSource, config_dir: Path | None) -> RewardSource:
    if source.function is None:
        return source
    module, _, name = source.function.rpartition(":")
    if module.endswith(".py") or "." in module:
        return source
    try:
        if importlib.util.find_spec(module) is not None:
            return source
    except (ImportError, ValueError):
        pass
    for folder in (Path.cwd(), config_dir):
        if folder is not None and (Path(folder) / f"{module}.py").is_file():
            return dataclasses.replace(source, function=f"{(Path(folder) / f'{module}.py').resolve()}:{name}")
    return source
