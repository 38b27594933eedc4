"""The command line every stage shares (`jaxrlhf STAGE`, dispatched by jaxrlhf/commands.py):
`--config FILE`, `key=value` overrides, `--dry-run` (every check the run makes before it
writes, then the plan), `--resume`, and errors as one clear line."""

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Callable

import jax

from jaxrlhf import config as cfg
from jaxrlhf import multihost, rewards
from jaxrlhf.errors import JaxRLHFError
from jaxrlhf.trainer import last_good


def add_multihost_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process runs", "Run the same command in every process, each with its own --process-id; all "
        "processes' devices form one mesh and every process gets the same output_dir (a shared filesystem).")
    group.add_argument("--multihost", action="store_true",
                       help="join the other processes first (jax.distributed.initialize); on a cluster with a "
                            "scheduler (SLURM, Cloud TPU) the flags below are discovered")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    group.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                       help="a process silent this long is lost: the others stop, naming it and the checkpoint "
                            f"to --resume from (default {multihost.HEARTBEAT_TIMEOUT})")


def join_processes(args) -> None:
    """Join a multi-process run as the flags say (before anything starts JAX)."""
    given = [f for f in ("coordinator", "num_processes", "process_id", "heartbeat_timeout")
             if getattr(args, f) is not None]
    if given and not args.multihost:
        raise JaxRLHFError(f"--{given[0].replace('_', '-')} is for multi-process runs; add --multihost")
    if args.heartbeat_timeout is not None and args.heartbeat_timeout < 1:
        raise JaxRLHFError(f"--heartbeat-timeout {args.heartbeat_timeout}: must be at least 1 (seconds)")
    if args.multihost:
        multihost.initialize_multihost(args.coordinator, args.num_processes, args.process_id,
                                       args.heartbeat_timeout or multihost.HEARTBEAT_TIMEOUT)


# The flags every process of a run must share (besides the config): the multi-process ones differ.
RUN_FLAGS = ("dry_run", "resume", "overwrite")


def agreed(load, settings, args):
    """`load()` (a stage's config, a pipeline's stages), refused on every process of a
    multi-process run unless all loaded the same `settings(loaded)` and `RUN_FLAGS` (or one
    failed to load: the others then stop too, pointing at its error)."""
    try:
        loaded = load()
    except JaxRLHFError as e:
        multihost.check_same_settings(e)
        raise
    flags = {f"--{f.replace('_', '-')}": getattr(args, f) for f in RUN_FLAGS if hasattr(args, f)}
    multihost.check_same_settings({**settings(loaded), **flags})
    return loaded


def resume_advice(config, who: str = "every process") -> str:
    """What to do after the run stopped (a process lost, a Ctrl-C), from where its stage stands
    now. Read from the folder, not through orbax, whose calls wait for every process."""
    train = getattr(config, "train", None)
    if train is None:
        return f"start {who} again"
    folder = Path(train.output_dir) / "checkpoints"
    # orbax names a step's folder by its number only once the step is complete.
    steps = [int(d.name) for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []
    if not steps:
        return f"no checkpoint was written; start {who} again"
    return f"{last_good(folder, max(steps))}; start {who} again with --resume"


def finish(body: Callable[[], None], multi_process: bool, advice: Callable[[], str]) -> int:
    """Run a command's `body` -> its exit code: 0; 2 with one error line; 130 on a Ctrl-C, saying
    where the run stands (`advice()`). The other processes of a multi-process run are told how
    this one ended (`multihost.finished`, `multihost.stopped`), so they stop naming it rather than
    wait for it. There a runtime error is most often a collective cut short by a lost process,
    whose line ends this process first (`multihost.await_lost_process`); otherwise it is
    reported in one line."""
    try:
        body()
    except JaxRLHFError as e:
        print(f"error: {e}", file=sys.stderr)
        return multihost.stopped(2, str(e))
    except jax.errors.JaxRuntimeError as e:
        if not multi_process:
            raise
        multihost.await_lost_process()
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {line}", file=sys.stderr)
        return multihost.stopped(2, line)
    except KeyboardInterrupt:
        print(f"interrupted; {advice()}", file=sys.stderr)
        return multihost.stopped(130, "interrupted (Ctrl-C)")
    multihost.finished()
    return 0


# stage name -> module holding its config class, `plan(config)`, `preflight(config, resume)` (every
# check `run` makes before it writes; run calls it) and `run(config, resume)`
STAGES = {
    "data": ("jaxrlhf.tasks.politeness", "PolitenessDataConfig"),
    "arithmetic_data": ("jaxrlhf.tasks.arithmetic", "ArithmeticDataConfig"),
    "gguf": ("jaxrlhf.stages.gguf", "GGUFConfig"),
    "sft": ("jaxrlhf.stages.sft", "SFTConfig"),
    "reward": ("jaxrlhf.stages.reward", "RewardConfig"),
    "ppo": ("jaxrlhf.stages.ppo", "PPOStageConfig"),
    "rloo": ("jaxrlhf.stages.rloo", "RLOOStageConfig"),
    "grpo": ("jaxrlhf.stages.grpo", "GRPOStageConfig"),
    "preferences": ("jaxrlhf.stages.preferences", "PreferencesConfig"),
    "dpo": ("jaxrlhf.stages.dpo", "DPOConfig"),
    "online_dpo": ("jaxrlhf.stages.online_dpo", "OnlineDPOConfig"),
    "evaluate": ("jaxrlhf.evaluate", "EvaluateConfig"),
    "frontier": ("jaxrlhf.frontier", "FrontierConfig"),
}


def stage(name: str):
    """-> (module, config class) of a stage."""
    if name not in STAGES:
        raise JaxRLHFError(f"unknown stage {name!r}; stages are {sorted(STAGES)}")
    module_name, cls_name = STAGES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, cls_name)


def trains(config_cls) -> bool:
    """Whether a stage trains (its config has a `train` section: a run folder with checkpoints)."""
    return any(f.name == "train" for f in dataclasses.fields(config_cls))


# What --resume does in a stage that does not train; a stage in neither place writes its output
# whole every time (data, gguf, evaluate) or always continues (frontier), so it does not offer it.
RESUMES_WITHOUT_TRAINING = {"preferences": "keep the pairs file already at output (it is only ever written whole, "
                                           "so one there is finished)"}


def resume_help(name: str, config_cls) -> str | None:
    """The --help of a stage's --resume, or None for a stage where it would change nothing."""
    if trains(config_cls):
        return "continue the run in train.output_dir from its latest checkpoint (with a larger train.steps, " \
               "a finished one)"
    return RESUMES_WITHOUT_TRAINING.get(name)


def describe_columns(module) -> list[str]:
    """The data columns a stage reads (its module's COLUMNS: form -> an example row), for --help."""
    columns = getattr(module, "COLUMNS", None)
    if not columns:
        return []
    lines = ["data columns (map yours onto these with data.columns / prompts.columns, e.g. "
             "data.columns={prompt: question}); an example row of each form:"]
    return lines + [f"  {form}: {json.dumps(row)}" for form, row in columns.items()]


def parse_stage_args(name: str, argv=None):
    """A stage's command line (`jaxrlhf STAGE ...`) -> (module, argparse namespace); `--help` lists the
    stage's data columns (with an example row each) and every config key."""
    module, config_cls = stage(name)
    parser = argparse.ArgumentParser(
        prog=f"jaxrlhf {name.replace('_', '-')}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(module.__doc__ or "").strip(),
        epilog="\n".join([*describe_columns(module), "", "config keys (set in the YAML file or as key=value):",
                          *cfg.describe(config_cls)]).lstrip("\n"))
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check the run makes before it writes (data, columns, models, tokenizers, "
                             "context, reward source, output folder), print the plan, write nothing")
    resume = resume_help(name, config_cls)
    if resume is None:
        parser.set_defaults(resume=False)  # what the stage's run is passed: it changes nothing there
    else:
        parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    add_multihost_flags(parser)
    # Stages that write one output whole (pairs, evaluations) may replace what is there when told.
    if "overwrite" in inspect.signature(module.run).parameters:
        parser.add_argument("--overwrite", action="store_true",
                            help="replace whatever is at the output path (refused by default)")
    return module, parser.parse_args(argv)


def stage_config(name: str, args):
    """The validated config a stage's parsed command line describes."""
    return rewards.locate_reward_functions(cfg.load(stage(name)[1], args.config, args.overrides),
                                       args.config.parent if args.config else None)


def one_line_warnings(main):
    """`main` with each warning on stderr as one line, `warning: MESSAGE`, beside its `error: ...`
    lines (not Python's file:line and source line, which point into jaxrlhf, not at the input)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        before, warnings.formatwarning = warnings.formatwarning, lambda message, *_, **__: f"warning: {message}\n"
        try:
            return main(*args, **kwargs)
        finally:
            warnings.formatwarning = before

    return wrapped


@one_line_warnings
def stage_main(name: str, argv=None) -> int:
    module, args = parse_stage_args(name, argv)
    loaded = []  # the config, once loaded: what a Ctrl-C's line says of the run

    def body():
        join_processes(args)
        config = agreed(lambda: stage_config(name, args), lambda c: {"stage": name, **cfg.flat(cfg.to_dict(c))},
                        args)
        loaded.append(config)
        multihost.when_a_process_is_lost(functools.partial(resume_advice, config))
        print(module.plan(config))
        options = {"overwrite": args.overwrite} if hasattr(args, "overwrite") else {}
        if args.dry_run:
            module.preflight(config, resume=args.resume, **options)
            print("dry run: every check passed; nothing written")
        else:
            module.run(config, resume=args.resume, **options)

    return finish(body, args.multihost, lambda: resume_advice(loaded[-1], "it") if loaded else "nothing was written")


def parse_memory_plan_args(argv=None):
    """`jaxrlhf memory-plan`'s command line -> argparse namespace."""
    parser = argparse.ArgumentParser(
        prog="jaxrlhf memory-plan", description="Per-device bytes of a training stage's params, optimizer state, "
        "frozen models, update temporaries and sampler KV cache on its mesh, from shapes alone (no weights read: "
        "config.json only; the update is compiled, never run), and the lever that brings the largest part down.")
    parser.add_argument("--config", type=Path, required=True, help="the stage's YAML config")
    parser.add_argument("--stage", help="the training stage it configures (default: the file's name, e.g. grpo.yaml; "
                                        "slic.yaml is dpo)")
    parser.add_argument("--model-config", metavar="NAME|FILE|DIR",
                        help="the policy's shape instead of the config's model: a named shape (gpt2-small, "
                             "smollm2-135m, llama-3.1-8b), a config.json or a checkpoint folder")
    parser.add_argument("--reward-config", metavar="NAME|FILE|DIR", help="the same for reward.model")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="plan on N fake CPU devices (the CPU compiler's figures), e.g. a GPU node's count on a "
                             "laptop")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (levers: "
                        "train.grad_accum_steps, train.mesh.fsdp, train.batch_size, lengths, ...)")
    return parser.parse_args(argv)


def memory_plan_config(args):
    """The training stage `jaxrlhf memory-plan`'s arguments name, and its config -> (name, config)."""
    name = args.stage or {"slic": "dpo"}.get(args.config.stem, args.config.stem)
    if name not in STAGES or not trains(stage(name)[1]):
        raise JaxRLHFError(f"--stage: say which training stage {args.config} configures (one of "
                           f"{sorted(n for n in STAGES if trains(stage(n)[1]))})")
    return name, cfg.load(stage(name)[1], args.config, args.overrides)


@one_line_warnings
def memory_plan_main(argv=None) -> int:
    """`jaxrlhf memory-plan`: a training stage's per-device memory from its config, compiled, never run."""
    args = parse_memory_plan_args(argv)

    def body():
        from jaxrlhf import memory

        if args.devices is not None:
            memory.fake_cpu_devices(args.devices)
        name, config = memory_plan_config(args)
        print(memory.report(memory.plan(name, config, args.model_config, args.reward_config)))

    return finish(body, False, lambda: "nothing was written")


def load_pipeline(path: Path) -> list[tuple[str, object, object]]:
    """The stages of a pipeline file, each validated -> [(name, module, config)]."""
    entries = cfg.read_yaml(path, "pipeline file").get("stages")
    if not isinstance(entries, list) or not entries:
        raise JaxRLHFError(f"{path}: expected a list under 'stages:' of {{stage: NAME, config: FILE}}")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) - {"stage", "config", "overrides"} or "stage" not in entry:
            raise JaxRLHFError(f"{path}: stage {i + 1} (counted from 1) must be {{stage: NAME, config: FILE, "
                               "overrides: [...]}")
        module, config_cls = stage(entry["stage"])
        config_path = path.parent / entry["config"] if entry.get("config") else None
        config = cfg.load(config_cls, config_path, entry.get("overrides", []))
        config_dir = config_path.parent if config_path else path.parent
        out.append((entry["stage"], module, rewards.locate_reward_functions(config, config_dir)))
    return out


@one_line_warnings
def pipeline_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="jaxrlhf pipeline",
        description="Run every stage of a pipeline file in order (default: the offline tiny one).")
    parser.add_argument("--config", type=Path, default=Path("configs/tiny/pipeline.yaml"))
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every stage config, run every check of the stages whose inputs exist "
                             "(those that read an earlier stage's output are checked when they run), print the plan")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, resume the interrupted one")
    add_multihost_flags(parser)
    args = parser.parse_args(argv)
    running = []  # the stage running, once one is: what a Ctrl-C's line says of the run

    def body():
        from jaxrlhf.stages import common  # as the stage modules: loaded when run

        join_processes(args)
        stages = agreed(lambda: load_pipeline(args.config), pipeline_settings, args)
        for i, (name, module, config) in enumerate(stages, 1):
            print(f"[{i}/{len(stages)}] {module.plan(config)}")
        if args.dry_run:
            dry_run(stages, args.resume)
            return
        for i, (name, module, config) in enumerate(stages, 1):
            train = getattr(config, "train", None)
            if args.resume and train is not None and (Path(train.output_dir) / "final" / "config.json").exists():
                common.check_finished_run(Path(train.output_dir), config)  # this config's run, its length too
                print(f"[{i}/{len(stages)}] {name}: already finished ({train.output_dir}/final), skipped")
                continue
            print(f"\n[{i}/{len(stages)}] {name}", flush=True)
            running.append(config)
            multihost.when_a_process_is_lost(functools.partial(resume_advice, config))
            module.run(config, resume=args.resume)

    return finish(body, args.multihost,
                  lambda: resume_advice(running[-1], "the pipeline") if running else "nothing was written")


def pipeline_settings(stages) -> dict:
    """What every process of a multi-process pipeline must agree on: each stage and its config."""
    return {f"stages[{i}].{k}": v for i, (name, _, config) in enumerate(stages)
            for k, v in {"stage": name, **cfg.flat(cfg.to_dict(config))}.items()}


def dry_run(stages, resume: bool) -> None:
    """`preflight` every stage of a pipeline whose inputs exist now; a stage that reads what an
    earlier stage writes can only be checked once that exists, when the pipeline runs it."""
    written: list[tuple[str, Path]] = []
    for i, (name, module, config) in enumerate(stages, 1):
        waits = [stage for stage, path in written if _reads_below(config, path)]
        if waits:
            print(f"[{i}/{len(stages)}] {name}: reads the output of {waits[0]}; checked when it runs")
        else:
            module.preflight(config, resume=resume)
            print(f"[{i}/{len(stages)}] {name}: every check passed")
        written += [(name, path) for path in _writes(config)]
    print("dry run: nothing written")


def _writes(config) -> list[Path]:
    """Where a stage writes: its run folder, pairs file or output folder."""
    train = getattr(config, "train", None)
    paths = [train.output_dir] if train is not None else []
    paths += [getattr(config, key) for key in ("output", "output_dir") if isinstance(getattr(config, key, None), str)]
    return [Path(p).resolve() for p in paths]


def _reads_below(config, folder: Path) -> bool:
    """Whether any path-like string in `config` (besides where it writes) lies in `folder`."""
    mine = set(_writes(config))
    values = [v for v in _strings(cfg.to_dict(config)) if v]
    return any(Path(v).resolve() not in mine and Path(v).resolve().is_relative_to(folder) for v in values)


def _strings(tree) -> list[str]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []
