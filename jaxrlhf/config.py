"""Stage configs: frozen dataclasses loaded from YAML, overridable with `key=value` arguments,
validated on load with errors that name the file, the key and what is allowed.

Nested sections are nested dataclasses (`train.learning_rate=1e-4` on the command line).
"""

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxrlhf.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, with floats as people write them: YAML 1.1 wants a dot in a float,
    so plain PyYAML reads `1e-4` as the string "1e-4" (YAML 1.2 and Python read a number)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no tags that build objects), numbers such as `5e-4` as floats."""
    return yaml.load(text, Loader=_Loader)


def _type_name(t) -> str:
    if typing.get_origin(t) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(t))
    if t is type(None):
        return "null"
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    return getattr(t, "__name__", str(t))


def _coerce(value: Any, t, where: str) -> Any:
    """Check `value` against the annotation `t` (building nested dataclasses); int -> float ok."""
    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a section (a mapping of keys), not {value!r}")
        return from_dict(t, value, where)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(t):
            if isinstance(value, dict) and dataclasses.is_dataclass(option):
                return _coerce(value, option, where)  # a section: its own errors say what is wrong in it
            if isinstance(value, (list, tuple)) and typing.get_origin(option) in (list, tuple):
                return _coerce(value, option, where)  # a list: its items' own errors say which is wrong
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}={value!r} must be {_type_name(t)}")
    if origin is Literal:
        _check_choice(value, t, where)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        _, vt = typing.get_args(t)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        (it, *_) = typing.get_args(t)
        return tuple(_coerce(v, it, f"{where}[{i}]") for i, v in enumerate(value))
    if t is type(None):
        if value is not None:
            raise ConfigError(f"{where}={value!r} must be null")
        return None
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t is Any:
        return value
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ConfigError(f"{where}={value!r} must be {_type_name(t)}")
    return value


def _check_choice(value: Any, t, where: str) -> None:
    if value not in typing.get_args(t):
        raise ConfigError(f"{where}={value!r} is not allowed; choose one of {list(typing.get_args(t))}")


def check_choices(config) -> None:
    """Every `Literal` key of dataclass `config` holds one of its choices: what loading from YAML
    checks, for a config built in Python (where a misspelt choice would otherwise pass)."""
    for name, t in typing.get_type_hints(type(config)).items():
        if typing.get_origin(t) is Literal:
            _check_choice(getattr(config, name), t, name)


def from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from `data`; unknown keys are errors that suggest the nearest name
    (or, for a key `cls.REMOVED` names, say what replaced it)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key in getattr(cls, "REMOVED", {}):
            raise ConfigError(f"{where}: key {key!r} was removed; {cls.REMOVED[key]}")
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(fields)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.learning_rate=1e-4", "seed=3"] -> {"train": {"learning_rate": 1e-4}, "seed": 3}."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        value = load_yaml(raw) if raw else ""
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load(cls, path: str | Path | None, overrides: list[str] = ()):
    """Read YAML `path` (or start empty), apply `overrides`, validate into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path, "config file")
    return from_dict(cls, _merge(data, parse_overrides(list(overrides))), "config" if path is None else str(path))


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in YAML file `path` (`what` it is, for errors that name the file and line)."""
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where_in = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where_in}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys at the top level")
    return data


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key (nested ones dotted), with type and default: each stage's --help (`jaxrlhf STAGE --help`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, t = prefix + f.name, hints[f.name]
        section = next((a for a in typing.get_args(t) if dataclasses.is_dataclass(a)), t)  # e.g. a reward source
        if dataclasses.is_dataclass(section):
            listed = any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(t))
            lines += [f"  {name} (a section, or {'a list of them' if listed else 'null'})"] * (section is not t)
            lines += describe(section, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        doc = f.metadata.get("help", "")
        lines.append(f"  {name} ({_type_name(t)}; default {default!r}){': ' + doc if doc else ''}")
    return lines


def to_dict(config) -> dict[str, Any]:
    """Plain data for YAML / JSON (tuples as lists)."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 2}} -> {"train.steps": 2}: the keys as the command line names them."""
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition: for range checks in __post_init__."""
    if not condition:
        raise ConfigError(message)


def pad_token_key():
    """The `pad_token` key of every config that loads a tokenizer (see `data.set_pad_token`)."""
    return dataclasses.field(default=None, metadata={"help": (
        "the token batches are padded with; null: the tokenizer's own, else its EOS (as TRL pads GPT-2, "
        "whose stock tokenizer has none)")})


# --- Sections shared by several stages ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where rows come from: a hub dataset name or a local json/jsonl/csv/parquet file."""

    path: str
    split: str = "train"
    # Our column names -> the dataset's (e.g. {"prompt": "review"}); unmapped ones keep our name.
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    max_rows: int | None = None
    skip_rows: int = 0  # e.g. hold out the first rows of a file for evaluation

    def __post_init__(self):
        check(self.max_rows is None or self.max_rows > 0, f"max_rows={self.max_rows} must be positive")
        check(self.skip_rows >= 0, f"skip_rows={self.skip_rows} must be >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The devices a stage runs on (all processes): `data` x `fsdp`. Rows of every batch split
    over all of them; `fsdp` > 1 also splits params and optimizer state (ZeRO-3 style)."""

    data: int | None = None  # null: every device the fsdp axis leaves
    fsdp: int = 1

    def __post_init__(self):
        check(self.data is None or self.data >= 1, f"mesh.data={self.data} must be at least 1 (or null: all devices)")
        check(self.fsdp >= 1, f"mesh.fsdp={self.fsdp} must be at least 1")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How a stage's models compute. `dtype`: the compute dtype of every model the stage runs
    (policy, sampler, reference, reward model, value head); trained params and optimizer state
    stay float32, params the stage does not train are stored in it; logits, logprobs, losses,
    softmax and norm statistics stay float32. `remat: block` recomputes each transformer block's
    activations in the backward pass instead of holding them (less memory, about one more
    forward of compute; the same gradients)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "block"] = "none"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning (README, "LoRA adapters"): the base model is
    frozen; only the adapters (and PPO's value head, a reward model's classifier) train. PEFT's
    names and defaults: `targets` are PEFT's module names (GPT-2 c_attn, c_proj, c_fc; Llama
    q_proj ... down_proj; BERT query, key, value, dense), or all-linear; null: PEFT's default for
    the model type. `adapter`: a PEFT adapter folder to start from (its rank, alpha and targets
    must be these)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0  # on each adapter's input, in the loss passes only
    targets: tuple[str, ...] | str | None = None  # one name as a string too, as PEFT takes "all-linear"
    adapter: str | None = None

    def __post_init__(self):
        check(self.rank >= 1, f"rank={self.rank} must be at least 1")
        check(self.alpha > 0, f"alpha={self.alpha} must be > 0")
        check(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        check(self.targets is None or len(self.targets) > 0, "targets=[] names no layer; leave it out (null) for "
                                                             "PEFT's default or name the layers")


def check_no_remat(compute: ComputeConfig, stage: str) -> None:
    """A stage that trains nothing has no backward pass for `compute.remat` to save memory in."""
    check(compute.remat == "none", f"compute.remat={compute.remat!r} does nothing in {stage}, which trains "
                                   "nothing (no backward pass to rematerialise); remove it")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, loop length, checkpoints and logs of a training stage."""

    # Keys of older versions, each with what replaced it (for the error that refuses it).
    REMOVED: typing.ClassVar[dict[str, str]] = {
        "devices": "the devices are train.mesh.data (how many the rows split over; null: all) and train.mesh.fsdp "
                   "(how many of those also split the params)"}

    output_dir: str = "runs/stage"
    seed: int = 0
    batch_size: int = 16  # rows per step, over all devices and microbatches
    steps: int = 100  # optimizer updates (PPO: iterations, each of ppo.epochs x ppo.num_minibatches updates)
    learning_rate: float = 1e-4
    # The schedule and its warm-up count optimizer updates (PPO's too), so it ends with the run.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    # Split each device's batch (PPO, RLOO, GRPO: each minibatch) into this many microbatches run
    # one after another, and score the whole batch or rollout (old and reference logprobs,
    # values) in chunks of the same size: the update's activations and logits are about 1/k of
    # the whole batch's. The update is the whole batch's, token-weighted.
    grad_accum_steps: int = 1
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = False
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or skip that update

    def __post_init__(self):
        for name in ("batch_size", "steps", "log_every", "save_every", "keep_checkpoints", "grad_accum_steps"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        # How rows split over the devices is checked when the mesh exists (stages.common.make_mesh).
        check(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.save_every > self.steps:  # allowed (checkpoints cost time and disk), but rarely meant
            warnings.warn(f"train.save_every={self.save_every} exceeds train.steps={self.steps}: the only checkpoint "
                          "is the last step's, so a run stopped before its end leaves nothing to --resume")


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """Generation settings (see `jaxrlhf.sampling.SamplingConfig`)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_prompt_tokens: int = 32
    # Truncate each prompt to a length drawn from [min, max] tokens (the IMDB recipe); off when null.
    prompt_length_range: tuple[int, ...] | None = None

    def __post_init__(self):
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")
        check(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        check(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        r = self.prompt_length_range
        check(r is None or (len(r) == 2 and 1 <= r[0] <= r[1] <= self.max_prompt_tokens),
              f"prompt_length_range={r} must be [min, max] with 1 <= min <= max <= max_prompt_tokens")


@dataclasses.dataclass(frozen=True)
class RewardSource:
    """A reward: our trained reward model or any HF classifier (`model`, its logit `label`, a name
    or index, default 0), or a Python function `module:function` (importable, `module.py` in the
    working directory or beside the config, or `file.py:function`; see `rewards.function_scorer`),
    its scores times `weight` (TRL's `reward_weights`) in the total, `name` on its metrics."""

    model: str | None = None
    label: str | int | None = None
    function: str | None = None
    text: Literal["response", "prompt+response"] = "response"  # what a model scorer reads
    max_length: int = 128
    batch_size: int = 64
    pad_token: str | None = pad_token_key()
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        check((self.model is None) != (self.function is None),
              "a reward source needs exactly one of model (a checkpoint) or function ('module:function')")
        check(self.function is None or ":" in self.function,
              f"function={self.function!r} must look like 'package.module:function'")
        check(self.name is None or (bool(self.name) and "/" not in self.name), f"name={self.name!r}: empty or has '/'")
        check(math.isfinite(self.weight), f"weight={self.weight} must be a finite number")


Reward = RewardSource | tuple[RewardSource, ...]  # a stage's `reward:`: one source, or a weighted list
