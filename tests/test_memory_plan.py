"""The memory plan (`jaxrlhf memory-plan`): its figures are those of the real compiled step
and the real laid-out state, it plans an 8B shape from its config.json alone, and a bad input
is one error line."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxrlhf import config as cfg
from jaxrlhf import memory, parallel
from jaxrlhf.cli import memory_plan_config, memory_plan_main, parse_memory_plan_args
from jaxrlhf.models import from_config
from jaxrlhf.stages import common, grpo, sft
from jaxrlhf.stages.rollout import rollout_batch, sample, sampling_config

TINY_GPT2 = cfg.read_yaml("configs/tiny/sft.yaml", "config")["model_config"]
TINY_BERT = cfg.read_yaml("configs/tiny/reward.yaml", "config")["model_config"]
LLAMA_8B_PARAMS = 8_030_261_248  # Llama-3.1-8B: embeddings and LM head 2 x 525,336,576, 32 layers x 218,112,000, a norm


def checkpoint(folder, hf: dict) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    return str(folder)


def held(tree) -> int:
    """Bytes the first device holds of `tree`'s arrays."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def grpo_config(overrides):
    return cfg.load(grpo.GRPOStageConfig, "configs/tiny/grpo.yaml", overrides)


SFT_LEVERS = ["train.mesh.fsdp=2", "train.grad_accum_steps=2"]  # 4 devices: data 2 x fsdp 2, two microbatches


@pytest.mark.fast
def test_the_plan_is_the_real_compiled_step():
    """SFT on the tiny shapes: the plan's temporaries (compiled from shapes) are those of the
    stage's update compiled for the real laid-out state and batch."""
    config = cfg.load(sft.SFTConfig, "configs/tiny/sft.yaml", SFT_LEVERS)
    plan = memory.plan("sft", config)

    module, params, _ = from_config(TINY_GPT2, jax.random.key(0), head="lm")
    mesh = common.train_mesh(config.train)
    spec = sft.training(config)
    state = parallel.put_state(common.initial_state(module, params, config.train, spec)[0], mesh)
    rows = np.ones((config.train.batch_size, config.max_length), np.int32)
    batch = parallel.put_rows({"input_ids": rows, "attention_mask": rows, "loss_mask": rows}, mesh)
    with jax.set_mesh(mesh):
        compiled = parallel.jit_for_mesh(spec.step, mesh, state).lower(
            state, batch, parallel.put_replicated(jax.random.key(2), mesh)).compile()
    real = compiled.memory_analysis()
    assert plan.parts["update temporaries"] == real.temp_size_in_bytes > 0
    assert plan.analysis["argument"] == real.argument_size_in_bytes
    assert plan.parts["update batch"] == held(batch)
    assert plan.parts["params"] == held(state.params) < sum(x.nbytes for x in jax.tree.leaves(params))  # split
    assert plan.parts["optimizer state"] == held(state.opt_state)


@pytest.mark.fast
def test_the_plan_holds_the_real_state_frozen_models_and_kv_cache(tmp_path):
    """GRPO on the tiny shapes (fsdp 2): params, optimizer state, reference and reward model
    as the run lays them out from real weights, and the sampler's KV cache."""
    config = grpo_config([f"policy={checkpoint(tmp_path / 'policy', TINY_GPT2)}",
                          f"reward.model={checkpoint(tmp_path / 'reward', TINY_BERT)}", "train.mesh.fsdp=2"])
    plan = memory.plan("grpo", config, compile_update=False)

    module, params, _ = from_config(TINY_GPT2, jax.random.key(0), head="lm")
    mesh = common.train_mesh(config.train, config.grpo.num_minibatches, "grpo")
    state = parallel.put_state(common.initial_state(module, params, config.train, grpo.training(config))[0], mesh)
    assert plan.parts["params"] == held(state.params)
    assert plan.parts["optimizer state"] == held(state.opt_state)
    assert plan.parts["reference"] == held(state.ref_params) == plan.parts["params"]  # beta > 0
    _, reward_params, _ = from_config(TINY_BERT, jax.random.key(0), head="classification")
    assert plan.parts["reward model"] == held(parallel.put_state(reward_params, mesh))
    rows = config.train.batch_size // mesh.size
    width = config.sampling.max_prompt_tokens + config.sampling.max_new_tokens
    kv = 2 * TINY_GPT2["n_layer"] * rows * width * TINY_GPT2["n_embd"] * 4  # keys and values, float32
    assert plan.parts["sampler KV cache"] == kv + rows * width * 4 + 4  # + the positions and the write index
    # The update's batch the plan compiles for is the shape of a real rollout's.
    settings = sampling_config(config.sampling, SimpleNamespace(eos_token_id=0, pad_token_id=0), module.config)
    ids = np.ones((config.train.batch_size, config.sampling.max_prompt_tokens), np.int32)
    real = rollout_batch(sample(module, state.params, ids, ids, jax.random.key(1), settings, mesh),
                         np.zeros(config.train.batch_size, np.float32))
    shapes = {k: (v.shape, np.dtype(v.dtype)) for k, v in memory._batch("grpo", config, module, params).items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in real.items()}


@pytest.mark.fast
def test_an_8b_shape_plans_from_its_config_alone():
    """Llama-3.1-8B's shape (a named config.json) on 4 devices, fsdp 4: params, optimizer
    state and the frozen reference per device, without compiling the update."""
    lengths = ["sampling.max_prompt_tokens=128", "sampling.max_new_tokens=1024", "train.mesh.fsdp=4",
               "reward.model=null", "reward.function=m:f"]
    plan = memory.plan("grpo", grpo_config([*lengths, "grpo.beta=0.04"]), model_config="llama-3.1-8b",
                       compile_update=False)
    assert plan.parts["params"] == LLAMA_8B_PARAMS * 4 // 4  # float32, split 4 ways
    assert 0 <= plan.parts["optimizer state"] - 2 * plan.parts["params"] <= 64  # Adam's two moments and a count
    assert plan.parts["reference"] == plan.parts["params"]
    assert plan.parts["reward model"] == 0  # a function
    assert plan.parts["sampler KV cache"] == 2 * 32 * 16 * (128 + 1024) * 8 * 128 * 4 + 16 * (128 + 1024) * 4 + 4
    assert "not compiled" in memory.report(plan)
    no_kl = memory.plan("grpo", grpo_config([*lengths, "grpo.beta=0"]), model_config="llama-3.1-8b",
                        compile_update=False)
    assert no_kl.parts["reference"] == 0  # GRPO holds no reference without a KL
    bf16 = memory.plan("grpo", grpo_config([*lengths, "grpo.beta=0.04", "compute.dtype=bfloat16"]),
                       model_config="llama-3.1-8b", compile_update=False)
    assert bf16.parts["reference"] == plan.parts["reference"] // 2  # frozen models stored in bfloat16
    assert bf16.parts["params"] == plan.parts["params"]  # the trained ones stay float32
    assert bf16.parts["sampler KV cache"] < plan.parts["sampler KV cache"]


@pytest.mark.fast
def test_the_script_prints_the_plan_or_one_error_line(tmp_path, capsys):
    assert memory_plan_main(["--config", "configs/tiny/sft.yaml", *SFT_LEVERS]) == 0
    out = capsys.readouterr().out
    assert "memory plan: sft, gpt2 (2 layers, width 128, vocab 1024)" in out
    assert "update temporaries" in out and "largest part:" in out
    nowhere = tmp_path / "nowhere"  # not the checkout's runs/, which a pipeline run may have filled
    bad = [(["--config", "configs/tiny/grpo.yaml", f"policy={nowhere}"], f"error: policy={nowhere}: no config.json there"),
           (["--config", "configs/tiny/grpo.yaml", "--model-config", str(tmp_path / "nowhere")],
            "error: --model-config="),
           (["--config", "configs/tiny/sft.yaml", "train.grad_accum_steps=0"],
            "error: configs/tiny/sft.yaml.train: grad_accum_steps=0"),
           (["--config", "configs/tiny/sft.yaml", "train.batch_size=6"], "error: train.batch_size = 6 row(s)"),
           (["--config", "configs/tiny/data.yaml"], "error: --stage: say which training stage")]
    for argv, line in bad:
        assert memory_plan_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, (argv, err)


@pytest.mark.fast
def test_the_readme_plan_commands_load_as_written():
    lines = [line.split()[2:] for line in Path("README.md").read_text().splitlines()
             if line.startswith("jaxrlhf memory-plan ")]
    assert lines
    for argv in lines:
        args = parse_memory_plan_args(argv)
        name, config = memory_plan_config(args)
        assert memory.model_json(args.model_config, "--model-config")["model_type"]
        for item in args.overrides:  # each key reaches the config
            key, raw = item.split("=", 1)
            value = config
            for part in key.split("."):
                value = getattr(value, part)
            assert str(value) == raw or value == cfg.load_yaml(raw), item
