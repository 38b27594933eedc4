"""What every stage does the same way: models in, optimizer, the run folder, the export."""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxrlhf import config as cfg
from jaxrlhf import data, outputs, parallel
from jaxrlhf.errors import ConfigError, JaxRLHFError, OutputError
from jaxrlhf.models import from_config, frozen_params, load_pretrained, load_tokenizer, lora, peft, save_pretrained
from jaxrlhf.updates.common import TrainState, make_optimizer
from jaxrlhf.trainer import Checkpoints, run_loop


def model_options(compute: cfg.ComputeConfig) -> dict:
    """The `load_pretrained` / `from_config` keywords of a stage's `compute` section."""
    return {"dtype": compute.dtype, "remat": compute.remat == "block"}


def load_model(path: str | None, model_config: dict | None, tokenizer_path: str | None, seed: int, head: str,
               num_labels: int | None = None, pad_token: str | None = None,
               compute: cfg.ComputeConfig = cfg.ComputeConfig()):
    """A pretrained checkpoint (`path`), or a fresh model from `model_config` (a config.json
    dict) with the tokenizer at `tokenizer_path` -> (module, params, config, tokenizer).
    `num_labels` sets a classification head's width (a new head where the checkpoint differs);
    `pad_token` is the config's key (see `data.set_pad_token`); `compute` the stage's section
    (float32 params either way)."""
    if (path is None) == (model_config is None):
        raise ConfigError("give exactly one of model (a checkpoint path or hub name) or model_config (a fresh model)")
    if path is not None:
        module, params, config = load_pretrained(path, rng=jax.random.key(seed), head=head, num_labels=num_labels,
                                                 **model_options(compute))
    else:
        if tokenizer_path is None:
            raise ConfigError("model_config needs a tokenizer path (the key 'tokenizer')")
        model_config = dict(model_config) | ({} if num_labels is None else {"num_labels": num_labels})
        module, params, config = from_config(model_config, jax.random.key(seed), where="model_config", head=head,
                                             **model_options(compute))
    tokenizer = load_tokenizer(tokenizer_path or path, config)
    check_special_tokens(tokenizer, tokenizer_path or path, eos=head == "lm", pad_token=pad_token)
    return module, params, config, tokenizer


def load_policy(path: str, pad_token: str | None = None, compute: cfg.ComputeConfig = cfg.ComputeConfig(), **kwargs):
    """A causal LM policy checkpoint (GPT-2, Llama) and its tokenizer -> (module, params, config, tokenizer);
    `pad_token` is the config's key (see `data.set_pad_token`); `compute` the stage's section
    (float32 params either way); `kwargs` go to `load_pretrained` (e.g. `value_head=True`)."""
    module, params, config = load_pretrained(path, head="lm", **model_options(compute), **kwargs)
    return module, params, config, policy_tokenizer(path, config, pad_token)


def policy_tokenizer(path: str, model_config, pad_token: str | None = None):
    """A policy's tokenizer, checked against its model: it must end replies (EOS) and pad batches."""
    tokenizer = load_tokenizer(path, model_config)
    check_special_tokens(tokenizer, path, eos=True, pad_token=pad_token)
    return tokenizer


def check_special_tokens(tokenizer, where, eos: bool, pad_token: str | None = None) -> None:
    """Batches are padded with the pad token (`pad_token`, else the tokenizer's own, else its
    EOS: `data.set_pad_token`), and a policy's replies end with EOS (`eos`)."""
    if eos and tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {where} has no EOS token, so replies could never end; "
                          "is it the policy's own tokenizer?")
    data.set_pad_token(tokenizer, pad_token, where)


def check_context(tokens: int, what: str, model_config) -> None:
    """`what` (`tokens` long) must fit the model's positions."""
    if tokens > model_config.max_positions:
        raise ConfigError(f"{what} exceeds the model's context ({model_config.max_positions_key}={model_config.max_positions})")


def optimizer(train: cfg.TrainConfig, updates_per_step: int = 1):
    """The optimizer of a stage whose every step makes `updates_per_step` optimizer updates
    (PPO: epochs x minibatches) -> (optimizer, lr_at_step). The schedule counts updates, so it
    ends with the run; `lr_at_step(s)` is the learning rate of the last update of step `s`
    (1-based: the update just taken), as the stages log it."""
    tx, schedule = make_optimizer(
        train.learning_rate, schedule=train.schedule, warmup_steps=train.warmup_steps,
        total_steps=train.steps * updates_per_step, max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay)
    return tx, lambda s: float(schedule(s * updates_per_step - 1))  # optax counts updates from 0


def train_mesh(train: cfg.TrainConfig, minibatches: int = 1, section: str = "ppo"):
    """The run's mesh (`train.mesh`), after checking that every update's rows (the batch, or
    each of the `minibatches` of `section`: PPO's, RLOO's, GRPO's) split over its devices and
    each device's share over `train.grad_accum_steps` microbatches."""
    mesh = parallel.make_mesh(train.mesh.data, train.mesh.fsdp)
    what = "train.batch_size" if minibatches == 1 else \
        f"train.batch_size / {section}.num_minibatches ({train.batch_size} / {minibatches})"
    parallel.check_rows(train.batch_size // minibatches, mesh, what, train.grad_accum_steps)
    return mesh


# What a resumed run may change: how long it runs, what it logs and keeps, on how many devices
# and in how many microbatches (either way the update of the whole batch), whether blocks are
# rematerialised (the same gradients), what it does on a NaN, and where the folder is (it may
# have been moved). Anything else (compute.dtype among it: other rounding, other steps) would
# make config.json describe steps it did not train.
RESUMABLE = ("train.steps", "train.log_every", "train.save_every", "train.keep_checkpoints", "train.tensorboard",
             "train.mesh.data", "train.mesh.fsdp", "train.grad_accum_steps", "compute.remat", "train.on_nonfinite",
             "train.output_dir")
# What a finished run's export does not depend on, so that it may be reused under another value:
# all of the above but its length (more or fewer steps is another model).
FINISHED_MAY_CHANGE = tuple(k for k in RESUMABLE if k != "train.steps")


def check_output(stage: str, train: cfg.TrainConfig, config: Any, resume: bool, rows: int,
                 inputs=()) -> tuple[Path, dict]:
    """Check the run folder against this run, writing nothing -> (folder, the record for its
    config.json). `rows` is the number of data rows (or prompts) batches are drawn from;
    `inputs` the local paths the run reads, which its outputs must not overlap."""
    data.check_batch(rows, train.batch_size)
    out = Path(train.output_dir)
    outputs.check_apart(out / "final", inputs, "train.output_dir's export")
    record = {"_stage": stage, **cfg.to_dict(config), "_working_dir": str(Path.cwd())}
    saved = _saved_config(out)
    if saved is None and out.is_dir() and any(out.iterdir()):
        raise OutputError(f"output_dir {out} holds files but no jaxrlhf run ({outputs.listing(out)}); choose an "
                          "empty or new folder")
    latest = Checkpoints.latest_in(out)
    if latest is not None and not resume:
        raise JaxRLHFError(f"{out} already holds checkpoints (latest step {latest}); pass --resume to continue "
                           "that run, or choose another output_dir")
    if (out / "final").exists() and not resume:
        raise JaxRLHFError(f"{out / 'final'} already exists from an earlier run; choose another output_dir "
                           "(or pass --resume to finish that run)")
    if resume and (latest is not None or (out / "final").exists()):  # saved is not None: checked above
        _check_same_run(out, saved, record)
    nearest = next(p for p in (out, *out.absolute().parents) if p.exists())  # what mkdir would write into
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"output_dir {out} is not writable: {nearest} is "
                          f"{'a file' if not nearest.is_dir() else 'a folder this user cannot write to'}")
    return out, record


# The run folders `record_config` made in this process: a start that fails removes only those.
_MADE: set[Path] = set()


def record_config(checked: tuple[Path, dict]) -> Path:
    """Write the record `check_output` returned into the run folder's config.json."""
    out, record = checked

    def write():
        (_MADE.discard if out.exists() else _MADE.add)(out.resolve())
        # The working directory too: the config's relative paths are relative to it (export needs them).
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output_dir {out} is not writable: {e.strerror or e}") from None
        outputs.replace_file(out / "config.json", json.dumps(record, indent=2) + "\n", overwrite=True)

    # Every process has checked the folder before process 0 writes to it (on_main waits for all).
    parallel.on_main(write, out / "config.json")
    return out


@dataclasses.dataclass(frozen=True)
class Training:
    """What a training stage compiles, from its config alone: its update `step` (an update
    factory's), the optimizer updates each step makes, the dtype the state's frozen reference
    (the starting params) is stored in (None: no reference), the state's other fields (e.g.
    PPO's `kl_coef`) and its LoRA settings (`lora_settings`; None: full fine-tuning).
    The run and the memory plan (`jaxrlhf.memory`) both build their state and update from it."""

    step: Callable
    updates_per_step: int = 1
    reference: str | None = None  # the compute dtype the reference is stored in; None: no reference
    fields: dict = dataclasses.field(default_factory=dict)
    lora: dict | None = None


def lora_settings(section: cfg.LoRAConfig | None) -> dict | None:
    """The settings dict of a stage's `lora` section (None: full fine-tuning)."""
    return None if section is None else lora.settings(section.rank, section.alpha, section.dropout, section.targets)


def adapter_input(config) -> str | None:
    """The PEFT adapter folder a stage starts from (`lora.adapter`), among the paths it reads."""
    return None if config.lora is None else config.lora.adapter


def starting_adapters(section: cfg.LoRAConfig | None, params, family: str):
    """Preflight of a stage's `lora` section against its model (the targets must name the
    model's layers) -> (the adapters to start from: `lora.adapter`'s, or None for fresh ones or
    no LoRA; `params` with the modules the adapter folder saves whole, a classifier's head)."""
    if section is None:
        return None, params
    names = lora.module_names(section.targets, family)
    if section.adapter is None:
        return None, params
    adapters, saved = peft.load_adapter(section.adapter, params, family)
    if (saved["rank"], saved["alpha"], sorted(lora.paths(adapters))) != (section.rank, section.alpha,
                                                                         sorted(lora.target_paths(params, names))):
        raise ConfigError(f"lora.adapter {section.adapter} has rank {saved['rank']}, alpha {saved['alpha']} and "
                          f"targets {saved['targets']}; set lora.rank, lora.alpha and lora.targets to match")
    whole = flatten_dict(peft.load_modules_to_save(section.adapter, params, family))
    frozen = sorted({"/".join(path[:-1]) for path in whole if path[0] not in lora.HEADS})
    if frozen:  # the base is frozen: a module trained whole elsewhere would be folded into it silently
        raise ConfigError(f"lora.adapter {section.adapter} saves modules {frozen} whole; a LoRA run trains only "
                          f"{', '.join(lora.HEADS)} whole (merge that adapter into the base model first)")
    return adapters, unflatten_dict({**flatten_dict(params), **whole})


def initial_state(module, params, train: cfg.TrainConfig, training: Training, adapters=None):
    """The starting TrainState of a run (where `params` are: call under `jax.eval_shape` for
    its shapes alone) -> (state, lr_at_step). With LoRA the state trains `adapters` (default:
    fresh ones, `lora.init`) and the heads; the base is stored frozen in the compute dtype, as
    every frozen model (it is the reference too)."""
    tx, lr = optimizer(train, training.updates_per_step)
    frozen = dict(skip_nonfinite=train.on_nonfinite == "skip", grad_accum_steps=train.grad_accum_steps,
                  **training.fields)
    if training.lora is None:
        state = TrainState.create(module, params, tx, ref_params=None if training.reference is None else
                                  frozen_params(params, training.reference), **frozen)
        return state, lr
    if adapters is None:
        adapters = lora.init(params, training.lora, module.config.model_type, jax.random.key(train.seed))
    state = TrainState.create(module, lora.trainable(params, adapters), tx, base_params=frozen_params(
        params, module.dtype), lora_scale=lora.scale(training.lora), lora_dropout=training.lora["dropout"], **frozen)
    return state, lr


def start_training(ready: dict, train: cfg.TrainConfig, training: Training):
    """A training stage's start, after its preflight (`ready`: its "output", "module",
    "params" and "mesh", and "adapters" to start from if any): the run folder's config.json
    written, the starting TrainState (`initial_state`) laid out on the mesh -> (folder, state,
    lr_at_step)."""
    out = record_config(ready["output"])
    with parallel.on_host():
        state, lr = initial_state(ready["module"], ready["params"], train, training, ready.get("adapters"))
    return out, parallel.put_state(state, ready["mesh"]), lr


def train_loop(out: Path, state, step_fn, train: cfg.TrainConfig, resume: bool, stage: str,
               desc: str | None = None, **kwargs):
    """`trainer.run_loop` under the run's `train` settings, its records tagged with `stage` and
    its progress bar with `desc` (default: `stage`) -> the final state; `kwargs`
    (extra_metrics, evaluate) go to it. A run stopped before it wrote anything but its
    config.json (a reward function's bad scores at the first step, a Ctrl-C) leaves no folder."""
    try:
        return run_loop(out_dir=out, state=state, step_fn=step_fn, steps=train.steps, log_every=train.log_every,
                        save_every=train.save_every, keep_checkpoints=train.keep_checkpoints, resume=resume,
                        record={"stage": stage}, tensorboard=train.tensorboard, desc=desc or stage, **kwargs)
    except BaseException:
        if parallel.is_main():  # the process that wrote the folder
            _remove_if_empty_run(out)
        raise


def _remove_if_empty_run(out: Path) -> None:
    """Undo a run's start that left nothing to resume: if `out` holds nothing but its
    config.json and an empty checkpoints/ folder, remove those, and `out` itself if this run made
    it (a folder the user made, a mount point, stays). Anything else there (a checkpoint, a
    metric record, any file) keeps all. Best effort: the error that stopped the run is the one
    to report."""
    checkpoints = out / "checkpoints"
    try:
        if not {p.name for p in out.iterdir()} <= {"config.json", "checkpoints"} or \
                checkpoints.exists() and not (checkpoints.is_dir() and not any(checkpoints.iterdir())):
            return
        if checkpoints.exists():
            checkpoints.rmdir()
        (out / "config.json").unlink(missing_ok=True)
        if out.resolve() in _MADE:
            out.rmdir()
    except OSError:
        pass


def check_finished_run(out: Path, config: Any) -> None:
    """The finished run in `out` (its export on disk) must be the run `config` describes, as
    `--resume` checks it but for its length too (for a caller that skips finished runs rather
    than resuming them: the export it reuses is of the steps config.json records)."""
    saved = _saved_config(out)
    if saved is None:
        raise JaxRLHFError(f"{out / 'final'} exists but {out} holds no jaxrlhf run's config.json; choose another "
                           "output_dir")
    diffs = _changes(saved, cfg.to_dict(config), FINISHED_MAY_CHANGE)
    if diffs:
        raise JaxRLHFError(f"{out / 'final'} is the export of a finished run, but this config changes {diffs}; "
                           f"undo the change, or delete {out} (or choose another output_dir) to train it anew")


def _saved_config(out: Path) -> dict | None:
    """The config.json an earlier run left in `out`, or None; an error if it is not one of ours."""
    path = out / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or "_working_dir" not in saved:
        raise JaxRLHFError(f"{path} exists and is not a jaxrlhf run's config; choose another output_dir")
    return saved


def _check_same_run(out: Path, saved: dict, record: dict) -> None:
    """A resumed run must be the run whose checkpoints it continues."""
    if saved.get("_stage", record["_stage"]) != record["_stage"]:
        raise JaxRLHFError(f"{out} holds a {saved['_stage']} run, not a {record['_stage']} run; "
                           "choose another output_dir")
    diffs = _changes(saved, record, RESUMABLE)
    if diffs:
        raise JaxRLHFError(f"--resume continues the run in {out} as it was configured, but this config changes "
                           f"{diffs}; undo the change or choose another output_dir (a resume may change only "
                           f"{', '.join(RESUMABLE)})")


# Keys added after run folders were first written, with the value that does what those runs did:
# a config.json written before a key existed reads as that value, so such a run still resumes.
ADDED_SINCE = {"compute.dtype": "float32", "compute.remat": "none", "reward.weight": 1.0, "reward.name": None,
               "lora": None}


def _changes(saved: dict, record: dict, free: tuple[str, ...]) -> str:
    """The keys `record` changes from the `saved` config.json (but those in `free`), as
    "key (old -> new), ...", or "" when it changes none."""
    before, now = cfg.flat(saved), cfg.flat(record)
    before |= {k: v for k, v in ADDED_SINCE.items() if k not in before and k in now}
    changed = [k for k in sorted(set(before) | set(now))
               if not k.startswith("_") and k not in free and before.get(k, "(unset)") != now.get(k, "(unset)")]
    return ", ".join(f"{k} ({before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r})" for k in changed)


def trained_model(state: TrainState):
    """The trained model as plain params (with LoRA: the base and heads, the adapters merged in)."""
    return state.params if state.base_params is None else lora.merged(state.base_params, state.params,
                                                                        state.lora_scale)


def save_lora_adapter(folder: Path, trained: dict, lora_settings: dict, family: str, base_model: str | None,
                      **record) -> Path:
    """A LoRA run's trained leaves (`state.params` or a checkpoint's: adapters and heads) as a
    PEFT adapter in `folder`, the heads saved whole as PEFT's `modules_to_save` (PPO's value head
    is ours: left out), for `base_model` (a local folder by its absolute path, so the adapter
    finds it from anywhere; a hub name as it is). `record` goes into its marker file."""
    heads = {k: v for k, v in trained["heads"].items() if k != "v_head"}
    if base_model is not None and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    return peft.save_adapter(folder, trained["lora"], lora.peft_settings(lora_settings, family), family, base_model,
                             modules_to_save=heads or None, **record)


def export(out: Path, module, state: TrainState, tokenizer, lora_settings: dict | None = None,
           base_model: str | None = None) -> Path:
    """The run's final model (`state`'s, as global arrays; with LoRA merged, `trained_model`)
    in HF layout at `out/final`, replacing the one an earlier part of the same run wrote
    (`check_output` has checked the folder is this run's); a value head stays in the
    checkpoints (the export is the plain LM). With LoRA (`lora_settings`) the adapter also goes
    to `out/adapter` in PEFT's format, for `base_model`. Written by process 0."""
    params = trained_model(state)
    if getattr(module, "value_head", False):
        module, params = module.clone(value_head=False), {k: v for k, v in params.items() if k != "v_head"}
    params = parallel.gather(params)
    trained = None if lora_settings is None else parallel.gather(state.params)

    def write():
        try:
            path = save_pretrained(out / "final", module, params, tokenizer=tokenizer, overwrite=True,
                                   source=str(out.resolve()))
        except OutputError as e:
            raise OutputError(f"{e}; the checkpoints in {out / 'checkpoints'} are complete: export one with "
                              "jaxrlhf export") from None
        print(f"exported {type(module).__name__} in Hugging Face layout to {path}")
        if lora_settings is not None:
            save_lora_adapter(out / "adapter", trained, lora_settings, module.config.model_type, base_model,
                              source=str(out.resolve()))
            print(f"exported its LoRA adapter in PEFT's format to {out / 'adapter'}")

    # Every process returns once the export is on disk: the next stage of a pipeline reads it.
    parallel.on_main(write, out / "final")
    return out / "final"


def step_key(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)
