"""One interface over every reward: `scorer(prompts, responses) -> float32 [B]`.

Sources: a reward model we trained (BERT / DistilBERT regression head), any Hugging Face
sequence classifier (the logit of a chosen label), or a Python function named explicitly as
`module:function` (the only code a config may import). Model scorers read text, so the
policy's tokenizer and the scorer's may differ: responses are decoded, then re-encoded.
"""

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.config import RewardSource
from jaxrlhf.data import encode_texts, set_pad_token, warn_cut
from jaxrlhf.errors import CheckpointError, ConfigError, JaxRLHFError
from jaxrlhf.models import frozen_params, load_pretrained, load_tokenizer

Scorer = Callable[[list[str], list[str]], np.ndarray]


def _texts(source: RewardSource, prompts, responses) -> list[str]:
    return list(responses) if source.text == "response" else [p + r for p, r in zip(prompts, responses)]


def model_scorer(source: RewardSource, mesh, key: str = "reward", dtype: str = "float32") -> Scorer:
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

    def score(prompts: list[str], responses: list[str]) -> np.ndarray:
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


def function_scorer(source: RewardSource) -> Scorer:
    module_name, _, name = source.function.rpartition(":")
    try:
        fn = getattr(_import(module_name), name)
    except (ImportError, AttributeError, OSError) as e:
        raise ConfigError(f"reward function {source.function!r} cannot be imported: {e} (a module is looked for "
                          "on the Python path, then as a .py file in the working directory and beside the "
                          "config file)") from None

    def score(prompts: list[str], responses: list[str]) -> np.ndarray:
        try:
            values = fn(list(prompts), list(responses))
        except Exception as e:
            raise JaxRLHFError(f"reward function {source.function} raised {type(e).__name__}: {e}") from e
        return _checked_scores(values, len(responses), source.function)

    return score


def _checked_scores(values, n: int, name: str) -> np.ndarray:
    """What reward function `name` returned for `n` responses, as float32 `[n]`; else an error
    saying what is wrong: None (whole, or for some responses: numpy would read it as NaN), not
    numbers, the wrong count, or a score that is not finite."""
    must = "it must return one number per response (a list or array of floats)"
    if values is None:
        raise JaxRLHFError(f"reward function {name} returned None; {must}")
    rows = values.tolist() if isinstance(values, np.ndarray) else values
    if isinstance(rows, (list, tuple)):
        missing = [i for i, v in enumerate(rows, 1) if v is None]
        if missing:
            raise JaxRLHFError(f"reward function {name} returned None for {len(missing)} of its {len(rows)} scores "
                               f"(the first: response {missing[0]}, counted from 1); {must}")
    try:
        scores = np.asarray(values, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise JaxRLHFError(f"reward function {name} returned {_shown(values)}; {must}") from None
    if scores.shape[0] != n:
        raise JaxRLHFError(f"reward function {name} returned {scores.shape[0]} scores for {n} responses")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise JaxRLHFError(f"reward function {name} returned a non-finite score for {bad.size} of {n} responses "
                           f"(the first: response {bad[0] + 1}, counted from 1: {scores[bad[0]]})")
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


def make_scorer(source: RewardSource, mesh, key: str = "reward", dtype: str = "float32") -> Scorer:
    """The scorer of a reward source (at `key` in the config, for errors); a model scorer runs on
    `mesh` in compute `dtype` (a function runs in every process on all rows, so every process
    holds every score)."""
    return model_scorer(source, mesh, key, dtype) if source.model is not None else function_scorer(source)
