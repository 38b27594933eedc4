"""The README's Quickstart is the contract with new users: two commands, and CI runs the second."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Quickstart holds exactly one shell block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0].endswith("pip install -q -c constraints.txt -e . && .venv/bin/jaxrlhf pipeline")
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def readme_shell_commands() -> list[str]:
    """Every command in the README's shell blocks (a line's `&&`-joined commands apart)."""
    readme = (ROOT / "README.md").read_text()
    return [command.strip() for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S)
            for line in block.splitlines() for command in line.split("&&") if command.strip()]


def test_the_readme_shows_every_jaxrlhf_subcommand_and_only_those():
    """The README's commands are `jaxrlhf COMMAND ...` (the scripts are aliases it only mentions),
    each naming a subcommand there is, and between them every one."""
    from jaxrlhf.commands import COMMANDS

    shown = [c.split()[1] for c in readme_shell_commands() if c.split()[0].split("/")[-1] == "jaxrlhf"]
    assert set(shown) == set(COMMANDS), set(shown) ^ set(COMMANDS)
    assert not [c for c in readme_shell_commands() if "scripts/" in c]


def readme_stage_commands() -> list[list[str]]:
    """Every `jaxrlhf COMMAND --config ...` in the README's shell blocks, as argv after `jaxrlhf`
    (the memory plan's are tests/test_memory_plan.py's)."""
    import shlex

    return [shlex.split(c)[1:] for c in readme_shell_commands()
            if re.match(r"jaxrlhf [\w-]+ --config", c) and not c.startswith("jaxrlhf memory-plan ")]


def test_the_readme_override_examples_run_as_written(capsys, monkeypatch):
    """Each stage command the README shows parses as typed (from the repository root) into a
    valid config and plan (what --dry-run checks before it reads data and models: these read
    runs and hub checkpoints the test does not have), and every key=value in it, or quoted
    inline in the text, reaches the config with the value a reader expects (`1e-4` the number)."""
    import yaml

    from jaxrlhf import cli
    from jaxrlhf import config as cfg
    from jaxrlhf.commands import COMMANDS

    monkeypatch.chdir(ROOT)
    commands = readme_stage_commands()
    pipeline = [c for c in commands if c[0] == "pipeline"]
    stages = [c for c in commands if c[0] != "pipeline"]
    assert len(stages) >= 6 and pipeline
    for _, *args in pipeline:
        for name, module, config in cli.load_pipeline(Path(args[args.index("--config") + 1])):
            assert module.plan(config), (args, name)
    inline = re.findall(r"`((?:train|sampling|ppo)\.\w+=[^`\s]+)`", (ROOT / "README.md").read_text())
    assert "train.learning_rate=1e-4" in inline
    stages.append(["sft", "--config", "configs/tiny/sft.yaml", *inline])
    for command, *args in stages:
        name = COMMANDS[command].stage
        module, parsed = cli.parse_stage_args(name, [*args, "--dry-run"])
        assert module.plan(cli.stage_config(name, parsed)), args
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        config = cfg.load(cli.stage(name)[1], args[args.index("--config") + 1], overrides)
        for item in overrides:
            key, raw = item.split("=", 1)
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            assert value == yaml.safe_load(raw) or value == float(raw), (item, value)


def test_the_library_section_runs_as_written_and_shows_how_to_make_a_reward_scorer():
    """The Library section's Python runs as a reader pastes it, and it shows how to make a
    scorer with every argument `make_scorer` needs (the mesh a reward model scores on)."""
    section = (ROOT / "README.md").read_text().split("## Library", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    assert "make_scorer(" in code
    exec(compile(code, "README.md (## Library)", "exec"), {})


def test_a_test_in_neither_tier_or_in_both_stops_the_collection_naming_it():
    """The fast tier (`-m fast`) must not lose a test by accident: tests/conftest.py refuses a
    collection in which a test is marked neither fast nor slow, or both."""
    from tests import conftest

    class Item:
        def __init__(self, nodeid, *marks):
            self.nodeid, self.marks = nodeid, marks

        def get_closest_marker(self, name):
            return name if name in self.marks else None

    items = [Item("t::ok", "fast"), Item("t::unmarked"), Item("t::both", "fast", "slow"), Item("t::slow", "slow")]
    with pytest.raises(pytest.UsageError) as error:
        conftest.pytest_collection_modifyitems(None, items)
    assert "t::unmarked: neither" in str(error.value) and "t::both: fast and slow" in str(error.value)
    assert "t::ok" not in str(error.value)
    tiered = [Item("a", "fast"), Item("b", "slow"), Item("c", "fast"), Item("d", "slow"), Item("e", "slow")]
    tiered[1].fixturenames = ("tiny_run",)
    conftest.pytest_collection_modifyitems(None, tiered)
    assert [i.nodeid for i in tiered] == ["d", "e", "b", "a", "c"]  # slow first, those without a tiny run first
