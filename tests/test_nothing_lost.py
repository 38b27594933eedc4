"""Nothing a user wrote, or an earlier run left, is lost or half-written: writers replace only
their own earlier output, a run folder's config is its identity on --resume, metrics tell one
story after a resume, and a write that fails mid-run ends with one line and a run that resumes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrlhf import cli
from jaxrlhf.commands import export_main
from jaxrlhf.outputs import MARK
from tests.conftest import ROOT, SHRINK, TINY, interrupt_at_call
from tests.test_bad_input import evaluate_args, ppo_args, sft_args


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def sft_run(tiny_run, tmp_path_factory):
    """A finished two-step SFT run with checkpoints 1 and 2, inside a folder of its own."""
    run = tmp_path_factory.mktemp("project") / "runs" / "sft"
    assert cli.stage_main("sft", sft_args(tiny_run, run, "train.save_every=1")) == 0
    return run


@pytest.fixture
def run_copy(sft_run, tmp_path):
    return shutil.copytree(sft_run, tmp_path / "runs" / "sft")


@pytest.mark.slow
def test_export_refuses_a_folder_of_user_files_and_the_run_it_reads(sft_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    assert export_main([str(sft_run), str(mine)]) == 2
    assert "mine already exists and holds files jaxrlhf did not write (notes.txt)" in one_error(capsys)
    assert snapshot(mine) == {"notes.txt": b"a user's notes"}
    project = sft_run.parents[1]
    before = snapshot(project)
    for target in (project, sft_run.parent, sft_run, sft_run / "final", sft_run / "checkpoints" / "x"):
        for force in ([], ["--overwrite"]):
            assert export_main([str(sft_run), str(target), *force]) == 2
            assert "which this run reads from" in one_error(capsys), target
    assert snapshot(project) == before


@pytest.mark.slow
def test_export_replaces_an_earlier_export_and_anything_with_overwrite(sft_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export_main([str(sft_run), str(out), "--step", "1"]) == 0
    step_1 = load_file(out / "model.safetensors")
    assert export_main([str(sft_run), str(out)]) == 0  # its own earlier output: replaced by step 2
    step_2 = load_file(out / "model.safetensors")
    final = load_file(sft_run / "final" / "model.safetensors")
    assert all(np.array_equal(step_2[k], final[k]) for k in final)
    assert any(not np.array_equal(step_1[k], step_2[k]) for k in final)
    assert json.loads((out / MARK).read_text())["step"] == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("to be replaced")
    assert export_main([str(sft_run), str(mine), "--overwrite"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in out.iterdir())


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused_and_changes_nothing(tiny_run, run_copy, capsys):
    before = snapshot(run_copy)
    changed = sft_args(tiny_run, run_copy, "train.learning_rate=1e-4", "train.batch_size=8")
    assert cli.stage_main("sft", [*changed, "--resume"]) == 2
    err = one_error(capsys)
    assert "changes train.batch_size (32 -> 8), train.learning_rate (0.003 -> 0.0001);" in err, err
    assert cli.stage_main("sft", changed) == 2  # no --resume on a folder with checkpoints
    assert "already holds checkpoints (latest step 2); pass --resume" in one_error(capsys)
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_a_resume_may_extend_the_run_and_change_what_it_logs(tiny_run, run_copy, capsys):
    extended = sft_args(tiny_run, run_copy, "train.steps=3", "train.log_every=1", "train.keep_checkpoints=5")
    assert cli.stage_main("sft", [*extended, "--resume"]) == 0
    assert "resuming sft from step 2" in capsys.readouterr().err
    assert json.loads((run_copy / "config.json").read_text())["train"]["steps"] == 3
    assert [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [2, 3]


@pytest.mark.slow
def test_resume_onto_another_stages_folder_is_refused(tiny_run, run_copy, capsys, tmp_path):
    before = snapshot(run_copy)
    assert cli.stage_main("ppo", [*ppo_args(tiny_run, run_copy), "--resume"]) == 2
    assert f"{run_copy} holds a sft run, not a ppo run; choose another output_dir" in one_error(capsys)
    assert snapshot(run_copy) == before
    assert export_main([str(run_copy), str(tmp_path / "exported")]) == 0  # the folder still says what it holds


@pytest.mark.slow
def test_metrics_after_a_resume_tell_one_story(tiny_run, tmp_path, monkeypatch):
    from jaxrlhf import config as cfg
    from jaxrlhf.stages import sft

    def config(out):
        overrides = SHRINK["sft.yaml"] + [f"train.output_dir={out}", "train.steps=6", "train.save_every=2",
                                          "train.log_every=1", f"tokenizer={tiny_run / 'data' / 'tokenizers' / 'gpt2'}",
                                          f"data.path={tiny_run / 'data' / 'sft.jsonl'}"]
        return cfg.load(sft.SFTConfig, TINY / "sft.yaml", overrides)

    def records(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "steps_per_second"} for line in lines]

    sft.run(config(tmp_path / "straight"))
    interrupt_at_call(monkeypatch, sft, 6)  # steps 1-5 logged, checkpoint 4 saved
    with pytest.raises(KeyboardInterrupt):
        sft.run(config(tmp_path / "resumed"))
    monkeypatch.undo()
    assert [r["step"] for r in records(tmp_path / "resumed")] == [1, 2, 3, 4, 5]
    sft.run(config(tmp_path / "resumed"), resume=True)
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_write_lets_it_finish_then_stops(tiny_run, tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    from jaxrlhf.trainer import Checkpoints

    real = ocp.CheckpointManager.save

    def ctrl_c_while_writing(manager, step, *args, **kwargs):  # the write of checkpoint 2 has begun
        started = real(manager, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return started

    monkeypatch.setattr(ocp.CheckpointManager, "save", ctrl_c_while_writing)
    out = tmp_path / "run"
    assert cli.stage_main("sft", sft_args(tiny_run, out, "train.steps=4", "train.save_every=1")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted; the last good checkpoint is step 2 in {out / 'checkpoints'}; start it again with --resume"]
    assert Checkpoints.latest_in(out) == 2
    monkeypatch.undo()
    assert cli.stage_main("sft", [*sft_args(tiny_run, out, "train.steps=4", "train.save_every=1"), "--resume"]) == 0
    assert "resuming sft from step 2" in capsys.readouterr().err


def preference_args(tiny_run, output, *extra):
    return ["--config", str(TINY / "preferences.yaml"), *SHRINK["preferences.yaml"], "prompts.max_rows=16",
            f"policy={tiny_run / 'sft' / 'final'}", f"reward.model={tiny_run / 'reward' / 'final'}",
            f"prompts.path={tiny_run / 'data' / 'prompts.jsonl'}", f"output={output}", *extra]


@pytest.mark.slow
def test_preferences_never_replace_an_existing_file_unasked(tiny_run, tmp_path, capsys):
    output = tmp_path / "pairs.jsonl"
    output.write_text("my own pairs\n")
    assert cli.stage_main("preferences", preference_args(tiny_run, output)) == 2
    assert "pairs.jsonl already exists; choose another path, pass --overwrite" in one_error(capsys)
    assert cli.stage_main("preferences", [*preference_args(tiny_run, output), "--resume"]) == 0
    assert output.read_text() == "my own pairs\n"
    assert cli.stage_main("preferences", [*preference_args(tiny_run, output), "--overwrite"]) == 0
    pairs = [json.loads(line) for line in output.read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]  # no temporary file left beside it


@pytest.mark.slow
def test_evaluation_replaces_only_an_earlier_evaluation(tiny_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    assert cli.stage_main("evaluate", evaluate_args(tiny_run, mine)) == 2
    assert "mine already exists and holds files jaxrlhf did not write (results.md)" in one_error(capsys)
    assert snapshot(mine) == {"results.md": b"my notes"}
    out = tmp_path / "eval"
    for _ in range(2):  # the second run replaces the first's folder whole
        assert cli.stage_main("evaluate", evaluate_args(tiny_run, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == [MARK, "replies.jsonl", "results.json", "results.md", "rewards.png",
                                                     "samples.md"]
    assert cli.stage_main("evaluate", [*evaluate_args(tiny_run, mine), "--overwrite"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in out.iterdir())


@pytest.mark.fast
def test_numbers_parse_as_users_write_them(tmp_path):
    from jaxrlhf import config as cfg
    from jaxrlhf.stages.sft import SFTConfig

    path = tmp_path / "sft.yaml"
    path.write_text("data: {path: x.jsonl}\ntrain: {learning_rate: 5e-4, weight_decay: 1E-2, max_grad_norm: .5e1}\n")
    train = cfg.load(SFTConfig, path, ["train.warmup_steps=10", "train.learning_rate=1e-4"]).train
    assert (train.learning_rate, train.weight_decay, train.max_grad_norm, train.warmup_steps) == (1e-4, 1e-2, 5.0, 10)
    assert cfg.load(SFTConfig, path).train.learning_rate == 5e-4
    assert cfg.parse_overrides(["data.path=1e4-notes.jsonl"]) == {"data": {"path": "1e4-notes.jsonl"}}


# A run on a small private filesystem (a tmpfs in a new mount namespace, so nothing is left
# mounted), which fails under the run once checkpoint 20 is safe; then the run resumes.
WRITE_FAILURE = """
set -u
mount -t tmpfs -o size=8m tmpfs "$DISK"
{python} {script} {args} >"$LOGS/out" 2>"$LOGS/err" &
run=$!
while [ ! -e "$DISK/run/checkpoints/20/commit_success.txt" ] && kill -0 $run 2>/dev/null; do sleep 0.05; done
{break_disk}
wait $run
echo $? >"$LOGS/rc"
{mend_disk}
ls "$DISK/run/checkpoints" >"$LOGS/checkpoints"
{python} {script} {args} --resume >"$LOGS/resumed.out" 2>"$LOGS/resumed.err"
echo $? >"$LOGS/resumed.rc"
"""


def user_namespaces() -> bool:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not user_namespaces(), reason="needs unprivileged user namespaces (unshare -rm) to mount a "
                                                  "private tmpfs; CI's machine has them")
@pytest.mark.parametrize("break_disk,mend_disk,cause", [
    ('dd if=/dev/zero of="$DISK/filler" bs=64k 2>/dev/null', 'rm "$DISK/filler"', r"not enough space|No space left on device"),
    ('mount -o remount,ro "$DISK"', 'mount -o remount,rw "$DISK"', r"Read-only file system"),
], ids=["disk full", "read-only"])
def test_a_write_failure_mid_run_ends_in_one_line_and_the_run_resumes(tiny_run, tmp_path, break_disk, mend_disk,
                                                                      cause):
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    args = " ".join(sft_args(tiny_run, disk / "run", "train.steps=60", "train.save_every=20", "train.log_every=5",
                             "train.keep_checkpoints=5"))
    script = textwrap.dedent(WRITE_FAILURE).format(python=sys.executable, script=ROOT / "scripts" / "sft.py",
                                                   args=args, break_disk=break_disk, mend_disk=mend_disk)
    env = {**os.environ, "DISK": str(disk), "LOGS": str(logs), "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # -r: root inside a new user namespace, so mounting needs no privileges outside it.
    subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env, cwd=ROOT, timeout=600, check=True)
    err = (logs / "err").read_text()
    assert (logs / "rc").read_text().strip() == "2", err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("error: cannot write ") and str(disk / "run") in lines[0], lines[0]
    assert re.search(cause, lines[0]) and "the last good checkpoint is step 20" in lines[0], lines[0]
    assert "20" in (logs / "checkpoints").read_text().split()
    assert (logs / "resumed.rc").read_text().strip() == "0", (logs / "resumed.err").read_text()[-3000:]
    assert "resuming sft from step" in (logs / "resumed.err").read_text()
