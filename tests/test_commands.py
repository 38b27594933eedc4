"""The `jaxrlhf` command: `pip install` puts it on the PATH, `jaxrlhf --help` lists every stage and
tool, each subcommand is what its script in scripts/ was (the scripts are now its aliases), and a
missing or unknown subcommand is one error line and exit code 2."""

import importlib.metadata
import json
import os
import runpy
import subprocess
import sys
import tomllib

import pytest

from jaxrlhf import cli, commands
from jaxrlhf import config as cfg
from tests.conftest import ROOT
from tests.test_bad_input import sft_args

pytestmark = pytest.mark.fast

# script in scripts/ -> the subcommand it is an alias of (the README's names for the stages).
ALIASES = {"sft": "sft", "train_reward": "reward", "ppo": "ppo", "rloo": "rloo", "grpo": "grpo",
           "make_preferences": "preferences", "dpo": "dpo", "online_dpo": "online-dpo", "evaluate": "evaluate",
           "chat": "chat", "export": "export", "pipeline": "pipeline", "frontier": "frontier",
           "memory_plan": "memory-plan", "gguf_to_hf": "gguf-to-hf"}
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, however the environment installed it


def run(*argv: str):
    return subprocess.run(list(argv), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)


def listed(help_out: str) -> dict[str, str]:
    """`jaxrlhf --help`'s command list -> {subcommand: its line}."""
    lines = help_out.split("commands:\n", 1)[1].splitlines()
    return dict(line.strip().split(None, 1) for line in lines if line.strip())


def test_jaxrlhf_help_lists_every_stage_and_tool_with_one_line_each():
    result = run(sys.executable, "-m", "jaxrlhf", "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert list(listed(result.stdout)) == list(ALIASES.values())
    assert all(len(summary) > 10 for summary in listed(result.stdout).values())


def test_no_subcommand_or_an_unknown_one_is_one_error_line_after_the_usage_and_exit_code_2():
    for argv, what in [([], "no command given"), (["train"], "unknown command 'train'"),
                       (["online_dpo", "--config", "x.yaml"], "unknown command 'online_dpo'")]:
        result = run(sys.executable, "-m", "jaxrlhf", *argv)
        assert result.returncode == 2 and result.stdout == "", argv
        usage, error = result.stderr.splitlines()
        assert usage.startswith("usage: jaxrlhf COMMAND"), usage
        assert error.startswith(f"error: {what}; one of sft, reward, ppo,") and "gguf-to-hf" in error, error


def test_pip_install_puts_the_jaxrlhf_command_next_to_python():
    """pyproject.toml declares the command; where the installed package's metadata has it (CI's
    fresh `pip install -e .`), the installer's executable runs `--help`."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"jaxrlhf": "jaxrlhf.commands:main"}
    if not importlib.metadata.entry_points(group="console_scripts", name="jaxrlhf"):
        pytest.skip("jaxrlhf was installed here before it had a command: `pip install -e .` again to get it")
    result = run(str(os.path.join(os.path.dirname(sys.executable), "jaxrlhf")), "--help")
    assert result.returncode == 0 and list(listed(result.stdout)) == list(ALIASES.values()), result.stderr


def run_script(name: str, argv: list[str], monkeypatch, capsys):
    """`python scripts/NAME.py ARGV`, in this process -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / f"{name}.py"), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name="__main__")
    return (exit_.value.code, *capsys.readouterr())


def run_command(argv: list[str], capsys):
    """`jaxrlhf ARGV`, in this process -> (exit code, stdout, stderr); argparse exits on --help."""
    try:
        code = commands.main(argv)
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def test_every_script_is_an_alias_of_its_subcommand_and_each_help_lists_the_stages_keys(monkeypatch, capsys):
    assert sorted(p.stem for p in (ROOT / "scripts").glob("*.py")) == sorted(ALIASES)
    for script, command in ALIASES.items():
        help_ = run_command([command, "--help"], capsys)
        assert help_[0] == 0 and help_[1].startswith(f"usage: jaxrlhf {command} "), (command, help_)
        assert run_script(script, ["--help"], monkeypatch, capsys) == help_, script
        stage = commands.COMMANDS[command].stage
        if stage is not None:  # a stage's subcommand is its pipeline name with "-" for "_"
            assert command == stage.replace("_", "-")
            assert all(line in help_[1] for line in cfg.describe(cli.stage(stage)[1])), command


def test_a_stage_through_the_command_runs_as_its_script(tiny_data, tmp_path, monkeypatch, capsys):
    """`jaxrlhf sft` and `python scripts/sft.py` on the same arguments: the same plan, checks,
    one-line errors and exit codes (--dry-run passing; --resume reaching the run folder's check,
    which only a resume makes, that it holds this stage's run; a bad key; a multi-process flag
    without --multihost)."""
    new, finished = tmp_path / "new", tmp_path / "finished"
    (finished / "final").mkdir(parents=True)
    (finished / "config.json").write_text(json.dumps({"_stage": "dpo", "_working_dir": str(tmp_path)}))
    cases = [[*sft_args(tiny_data, new), "--dry-run"], [*sft_args(tiny_data, finished), "--dry-run", "--resume"],
             [*sft_args(tiny_data, new, "train.stepz=3"), "--dry-run"],
             [*sft_args(tiny_data, new), "--process-id", "1"]]
    got = [run_command(["sft", *argv], capsys) for argv in cases]
    assert got == [run_script("sft", argv, monkeypatch, capsys) for argv in cases]
    assert got[0][0] == 0 and got[0][1].strip().endswith("dry run: every check passed; nothing written")
    errors = [err.splitlines() for code, _, err in got[1:] if code == 2]
    assert all(len(e) == 1 and e[0].startswith("error: ") for e in errors) and len(errors) == 3, errors
    said = [f"{finished} holds a dpo run, not a sft run", "train: unknown key 'stepz'",
            "--process-id is for multi-process runs; add --multihost"]
    assert all(part in e[0] for part, e in zip(said, errors, strict=True)), errors
    assert not new.exists()
