"""A Llama policy through every stage, as users run them: the tiny pipeline's data, then SFT of
a fresh Llama (grouped-query attention, untied LM head), PPO with a value head, preference
pairs, DPO and SLiC-HF, evaluation, chat and `jaxrlhf export`, on the tests' 4 devices."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
import yaml

from tests.conftest import SHRINK, TINY

pytestmark = pytest.mark.slow

LLAMA = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "tie_word_embeddings": False,
         "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
GROUND_TRUTH = {"function": "jaxrlhf.tasks.politeness:score_responses"}


def _stage(work: Path, name: str, stage: str, config: dict) -> dict:
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return {"stage": stage, "config": f"{name}.yaml"}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """The shrunk tiny pipeline with a Llama policy (the ground-truth score as the reward, so
    no reward model is trained) -> its runs/ folder."""
    work = tmp_path_factory.mktemp("llama")
    tiny = {name: yaml.safe_load((TINY / name).read_text()) for name in ("sft.yaml", "ppo.yaml", "dpo.yaml")}
    sft = {**tiny["sft.yaml"], "model_config": LLAMA, "train": {**tiny["sft.yaml"]["train"], "output_dir": "runs/tiny/sft"}}
    ppo = {**tiny["ppo.yaml"], "reward": GROUND_TRUTH}
    pairs = {"policy": "runs/tiny/sft/final", "reward": GROUND_TRUTH, "output": "runs/tiny/pairs.jsonl",
             "prompts": {"path": "runs/tiny/data/prompts.jsonl"}, "samples_per_prompt": 2, "pairing": "all",
             "sampling": {"max_prompt_tokens": 16}}
    slic = {**tiny["dpo.yaml"], "loss_type": "slic", "train": {**tiny["dpo.yaml"]["train"], "output_dir": "runs/tiny/slic"}}
    evaluate = {"policies": {p: f"runs/tiny/{p}/final" for p in ("sft", "ppo", "dpo", "slic")},
                "reference": "runs/tiny/sft/final", "prompts": {"path": "runs/tiny/data/eval_prompts.jsonl"},
                "scorers": {"ground_truth": GROUND_TRUTH}, "output_dir": "runs/tiny/eval",
                "sampling": {"max_prompt_tokens": 16}}
    stages = [
        {"stage": "data", "config": str(TINY / "data.yaml"), "overrides": SHRINK["data.yaml"]},
        {**_stage(work, "sft", "sft", sft), "overrides": [o for o in SHRINK["sft.yaml"] if "model_config" not in o]},
        {**_stage(work, "ppo", "ppo", ppo), "overrides": SHRINK["ppo.yaml"]},
        {**_stage(work, "preferences", "preferences", pairs), "overrides": SHRINK["preferences.yaml"]},
        {**_stage(work, "dpo", "dpo", tiny["dpo.yaml"]), "overrides": SHRINK["dpo.yaml"]},
        {**_stage(work, "slic", "dpo", slic), "overrides": SHRINK["slic.yaml"]},
        {**_stage(work, "evaluate", "evaluate", evaluate), "overrides": SHRINK["evaluate.yaml"]},
    ]
    (work / "pipeline.yaml").write_text(yaml.safe_dump({"stages": stages}))
    old = Path.cwd()
    os.chdir(work)
    try:
        from jaxrlhf import cli

        assert cli.pipeline_main(["--config", str(work / "pipeline.yaml")]) == 0
    finally:
        os.chdir(old)
    return work / "runs" / "tiny"


def test_every_stage_trains_and_exports_a_llama_policy(llama_run):
    from jaxrlhf.models import LlamaForCausalLM, load_pretrained

    start = load_pretrained(llama_run / "sft" / "final")[1]
    for stage in ("sft", "ppo", "dpo", "slic"):
        module, params, config = load_pretrained(llama_run / stage / "final")
        assert isinstance(module, LlamaForCausalLM) and config.num_key_value_heads == 2
        assert "lm_head" in params and "v_head" not in params  # the untied head is exported, PPO's value head not
        assert transformers.AutoConfig.from_pretrained(llama_run / stage / "final").model_type == "llama"
        if stage != "sft":  # each method moved the policy it started from
            assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params)))
    pairs = [json.loads(line) for line in (llama_run / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    report = json.loads((llama_run / "eval" / "results.json").read_text())
    assert set(report) >= {"sft", "ppo", "dpo", "slic"}


def test_export_script_rebuilds_a_llama_ppo_checkpoint(llama_run, tmp_path):
    """`jaxrlhf export` on the PPO run (value head in the checkpoint, untied LM head): the
    export equals the stage's own final/ export."""
    from jaxrlhf.models import load_pretrained
    from jaxrlhf.commands import export_main as main

    assert main([str(llama_run / "ppo"), str(tmp_path / "ppo")]) == 0
    _, ours, _ = load_pretrained(tmp_path / "ppo")
    _, final, _ = load_pretrained(llama_run / "ppo" / "final")
    jax.tree.map(np.testing.assert_array_equal, ours, final)


def test_chat_with_a_llama_policy(llama_run):
    from jaxrlhf.chat import ChatSession
    from jaxrlhf.config import SamplingSection

    session = ChatSession(str(llama_run / "dpo" / "final"), SamplingSection(max_new_tokens=8), seed=1)
    assert not session.templated  # the tiny tokenizer has no chat template: prefixes
    session.reply("Can you walk the dog?")
    assert session.history.startswith("Request: Can you walk the dog?\nReply:")


def test_chat_writes_the_conversation_with_the_tokenizers_chat_template(llama_run, tmp_path, monkeypatch):
    import shutil

    from jaxrlhf import chat
    from jaxrlhf.config import SamplingSection

    folder = tmp_path / "templated"
    shutil.copytree(llama_run / "dpo" / "final", folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer.save_pretrained(folder)
    seen = []
    real = chat.encode_prompts
    monkeypatch.setattr(chat, "encode_prompts", lambda tok, prompts, *a, **k: seen.append(prompts[0]) or
                        real(tok, prompts, *a, **k))
    session = chat.ChatSession(str(folder), SamplingSection(max_new_tokens=8, max_prompt_tokens=48), seed=1)
    assert session.templated
    first = session.reply("Can you walk the dog?")
    session.reply("Thanks!")
    assert seen == ["<user>Can you walk the dog?\n<assistant>",
                    f"<user>Can you walk the dog?\n<assistant>{first}\n<user>Thanks!\n<assistant>"]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
