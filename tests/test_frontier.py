"""The reward-KL frontier on a shrunk tiny default, through the script's entry point: every
point a run of its stage with the knob set, the table the evaluation's numbers, best-of-N at
log N - (N - 1) / N, the plot two panels; a rerun skips every finished point."""

import json
import math

import pytest

from jaxrlhf import cli
from jaxrlhf import config as cfg
from jaxrlhf import frontier
from jaxrlhf.stages import common
from tests.conftest import TINY
from tests.test_reliability import tiny_overrides

SWEEPS = {  # method -> (stage, tiny config, knob, values)
    "ppo": ("ppo", "ppo.yaml", "ppo.kl_coef", [0.1]),
    "dpo": ("dpo", "dpo.yaml", "beta", [0.1, 0.5]),
    "slic": ("dpo", "slic.yaml", "slic_delta", [1.0]),
    "online_dpo": ("online_dpo", "online_dpo.yaml", "beta", [0.1, 0.5]),
}


def frontier_config(tiny_run, out):
    methods = {m: {"stage": stage, "config": str(TINY / name), "knob": knob, "values": values,
                   "overrides": tiny_overrides(name, tiny_run) + (["ppo.kl_target=null"] if m == "ppo" else [])}
               for m, (stage, name, knob, values) in SWEEPS.items()}
    config = {"evaluate": str(TINY / "evaluate.yaml"), "evaluate_overrides": tiny_overrides("evaluate.yaml", tiny_run),
              "output_dir": str(out), "methods": methods, "best_of": {"values": [1, 4], "scorer": "reward_model"}}
    path = out.parent / "frontier.yaml"
    path.write_text(json.dumps(config))
    return ["--config", str(path)]


@pytest.mark.slow
def test_frontier_sweeps_evaluates_tabulates_and_plots_every_point_and_a_rerun_skips_them(tiny_run, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "frontier"
    assert cli.stage_main("frontier", frontier_config(tiny_run, out)) == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    rows = json.loads((out / "report" / "frontier.json").read_text())
    md = (out / "report" / "frontier.md").read_text()

    want = [("sft", None)] + [(m, v) for m, (*_, values) in SWEEPS.items() for v in values] + \
        [("best_of_n", 1), ("best_of_n", 4)]
    assert [(r["method"], r["value"]) for r in rows] == want
    assert rows[0]["kl"] == 0.0
    assert ("| KL to SFT (best-of-N: the bound log N - (N - 1) / N) | best-of-N KL plug-in estimate (the evaluation's "
            "kl_to_reference) |") in md
    for r in rows[1:]:
        got = results[r["policy"]]
        for scorer in ("ground_truth", "reward_model"):
            assert r[scorer] == got[f"{scorer}/mean"]
        if r["method"] == "best_of_n":
            assert r["kl"] == math.log(r["value"]) - (r["value"] - 1) / r["value"]
            assert r["kl_estimate"] == got["_best_of_n"]["kl_estimate"] <= r["kl"] + 1e-12
        else:
            assert r["kl"] == got["kl_to_reference"]
            method, knob = r["method"], SWEEPS[r["method"]][2]
            point = json.loads((out / "points" / method / f"{knob}={r['value']:g}" / "config.json").read_text())
            section, _, key = knob.rpartition(".")
            assert (point[section] if section else point)[key] == r["value"]  # the knob was set
        line = f"| {r['method']} | {r['knob']} | {r['value']:g} | {r['kl']:.3f} |"
        assert line in md, line
    image = matplotlib.image.imread(out / "report" / "frontier.png")
    assert image.shape[:2] == (420, 1100)  # two panels (reward model, ground truth) of 5.5 x 4.2 in at 100 dpi
    assert image[..., :3].std() > 0.05

    capsys.readouterr()
    assert cli.stage_main("frontier", frontier_config(tiny_run, out)) == 0
    log = capsys.readouterr().out
    assert log.count("skipped") == len(want) - 3  # every trained point
    assert json.loads((out / "report" / "frontier.json").read_text()) == rows

    # A finished point is reused only as the run its config describes.
    changed = frontier_config(tiny_run, out)
    config = json.loads(open(changed[1]).read())
    config["methods"]["dpo"]["overrides"].append("train.learning_rate=0.1")
    open(changed[1], "w").write(json.dumps(config))
    assert cli.stage_main("frontier", changed) == 2
    assert "changes train.learning_rate (0.0005 -> 0.1)" in capsys.readouterr().err


@pytest.mark.fast
def test_dry_run_refuses_a_finished_point_of_another_length_and_two_values_of_one_name(tmp_path, capsys):
    """Checked before anything trains, on the config.json a point's run recorded (no training):
    a finished point is reused only at the length it was trained for, and each value of a knob
    must name its own point (folder and policy are named by the value to 6 digits)."""
    def dry_run(values, *overrides, **more):
        path = tmp_path / "frontier.yaml"
        dpo = {"stage": "dpo", "config": str(TINY / "dpo.yaml"), "knob": "beta", "values": values,
               "overrides": ["train.steps=4", "train.save_every=4", *overrides]}
        path.write_text(json.dumps({"evaluate": str(TINY / "evaluate.yaml"), "output_dir": str(tmp_path / "out"),
                                    "methods": {"dpo": dpo}, **more}))
        code = cli.stage_main("frontier", ["--config", str(path), "--dry-run"])
        return code, capsys.readouterr().err, cfg.load(frontier.FrontierConfig, path) if code == 0 else None

    code, _, config = dry_run([0.1])
    (point,) = frontier.points(config)
    train = point.config.train  # a finished run: its config.json as the stage records it, and its export
    common.record_config(common.check_output("dpo", train, point.config, False, train.batch_size))
    (tmp_path / "out" / "points" / "dpo" / "beta=0.1" / "final").mkdir()
    (tmp_path / "out" / "points" / "dpo" / "beta=0.1" / "final" / "config.json").write_text("{}")
    assert dry_run([0.1], "train.log_every=1")[:2] == (0, "")  # what its export does not depend on
    code, err, _ = dry_run([0.1], "train.steps=8")
    assert code == 2 and "beta=0.1/final is the export of a finished run, but this config changes train.steps " \
        "(4 -> 8)" in err, err
    code, err, _ = dry_run([0.1, 0.1000001])
    assert code == 2 and "values 0.1 and 0.1000001 of beta are one point (beta=0.1" in err, err
    assert frontier.finished(frontier.points(config)) == {point.name}  # as reused by the run
    # A trained point's x is its replies' KL, which top-k sampling leaves unknown; one N is one point.
    code, err, _ = dry_run([0.1], evaluate_overrides=["sampling.top_k=5"])
    assert code == 2 and "sampling with sampling.top_k gives no KL to plot the points at" in err, err
    code, err, _ = dry_run([0.1], best_of={"values": [4, 4], "scorer": "reward_model"})
    assert code == 2 and "best_of.values=[4, 4] names a point twice" in err, err


@pytest.mark.fast
def test_a_pipeline_resume_skips_a_finished_stage_only_at_the_length_it_was_trained_for(tmp_path, capsys):
    """`pipeline.py --resume` passes over a stage whose export exists, as the frontier does, only
    when it is this config's run (its length included), on the config.json it recorded."""
    out = tmp_path / "dpo"

    def resume(steps):
        path = tmp_path / "pipeline.yaml"
        path.write_text(json.dumps({"stages": [{"stage": "dpo", "config": str(TINY / "dpo.yaml"), "overrides": [
            f"train.steps={steps}", f"train.save_every={steps}", f"train.output_dir={out}"]}]}))
        return cli.pipeline_main(["--config", str(path), "--resume"]), capsys.readouterr()

    module, config_cls = cli.stage("dpo")
    config = cfg.load(config_cls, TINY / "dpo.yaml", ["train.steps=4", "train.save_every=4", f"train.output_dir={out}"])
    common.record_config(common.check_output("dpo", config.train, config, False, config.train.batch_size))
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    code, output = resume(4)
    assert code == 0 and f"dpo: already finished ({out}/final), skipped" in output.out, output
    code, output = resume(8)
    assert code == 2 and "is the export of a finished run, but this config changes train.steps (4 -> 8)" in \
        output.err, output
