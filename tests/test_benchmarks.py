"""The benchmark harness runs end to end (in its --quick form, every workload against its
PyTorch / TRL reference) so it cannot rot. Speed is reported, never asserted."""

import numpy as np
import pytest

from benchmarks import profiling, run
from benchmarks import workloads as wl


@pytest.mark.slow
def test_quick_run_compares_every_workload_and_writes_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Benchmarks\n\nprose before\n\n{run.START}\nold table\n{run.END}\n\nprose after\n")
    rows = run.main(["--quick", "--write", str(results), "--repeats", "1"])

    assert [(r[0], r[1]) for r in rows] == [(w.name, w.size) for w in wl.workloads(quick=True)]
    assert {r[0] for r in rows} == set(run.REFERENCES)
    for r in rows:
        cells = dict(zip(run.HEADER, r))
        ours, ref = float(cells["jaxrlhf ms"]), float(cells["reference ms"])
        assert ours > 0 and ref > 0
        assert float(cells["speed-up"].strip("*x")) == pytest.approx(ref / ours, rel=0.01)
        assert float(cells["jaxrlhf peak MB"]) > 100 and float(cells["reference peak MB"]) > 100
    text = results.read_text()
    assert "prose before" in text and "prose after" in text and "old table" not in text
    assert "Command: `python benchmarks/run.py --quick --write" in text
    assert "| sft | tiny |" in text and "matmul peak" in text


@pytest.mark.fast
def test_both_sides_get_the_same_data():
    w = wl.Workload("dpo", "tiny", batch=4, prompt=3, response=5)
    pairs = wl.preference_pairs(w)
    assert pairs["chosen"].shape == (4, 5) and (pairs["chosen"][:, -1] == wl.EOS).all()
    assert (pairs["prompt"] < wl.EOS).all()
    np.testing.assert_array_equal(pairs["chosen"], wl.preference_pairs(w)["chosen"])  # deterministic


@pytest.mark.fast
def test_the_reference_tokenizer_maps_words_to_the_benchmark_ids():
    from benchmarks.reference import word_tokenizer

    tok = word_tokenizer()
    assert tok("w5 w50255<|endoftext|>")["input_ids"] == [5, 50255, wl.EOS]
    assert tok.pad_token_id == tok.eos_token_id == wl.EOS


@pytest.mark.fast
def test_model_flops_follow_the_usual_accounting():
    # One GPT-2-small forward token at context 1: 12 layers x 24 d^2 + the LM head 2 d V, plus attention 4 L d.
    w = wl.Workload("sft", "gpt2-small", batch=1, prompt=0, response=1)
    d = 768
    assert wl.step_flops(w) == 3 * (12 * (24 * d * d + 4 * d) + 2 * d * wl.GPT2_VOCAB)


@pytest.mark.fast
def test_llama_flops_are_twice_the_matmul_params_per_token():
    # SmolLM2-135M: 134,515,008 params, 61 RMSNorm weight vectors of 576 outside any matmul; the
    # tied embedding counts once, as the LM head. Plus attention at context 1: 30 layers x 4 x 576.
    w = wl.Workload("sft", "smollm2-135m", batch=1, prompt=0, response=1)
    assert wl.step_flops(w) == 3 * (2 * (134_515_008 - 61 * 576) + 30 * 4 * 576)


@pytest.mark.fast
def test_results_file_keeps_its_prose_and_gains_a_table_block(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nnotes without a table yet\n")
    run.write_results("| t2 |", results)
    run.write_results("| t3 |", results)
    text = results.read_text()
    assert text.startswith("# Benchmarks\n\nnotes without a table yet\n")
    assert "| t3 |" in text and "| t2 |" not in text and text.count(run.START) == 1


@pytest.mark.slow
def test_decode_profile_puts_a_steps_ops_in_categories_and_rewrites_only_its_table(tmp_path):
    from benchmarks import decode_profile

    result = decode_profile.profile("tiny", 2, calls=1)
    per_step = result["per_step"]
    assert set(per_step) <= {c for c, _ in decode_profile.CATEGORIES}
    for category in ("q/k/v projections", "MLP matmuls", "LM head", "sampling (vocabulary passes, search)"):
        assert per_step[category] > 0, category
    assert per_step.get("copies and transposes", 0.0) == 0.0
    assert result["prefill_ms"] > 0 and result["wall_ms"] > 0
    alone = decode_profile.matmuls_alone("tiny", 2, repeats=1)
    assert set(alone) == {"jaxrlhf (XLA)", "PyTorch", decode_profile.ONE_MATMUL} and min(alone.values()) > 0

    results = tmp_path / "RESULTS.md"
    results.write_text(f"before\n{decode_profile.START}\nold\n{decode_profile.END}\nafter\n")
    profiling.write(decode_profile.table({("tiny", 2): result}), results, decode_profile.START, decode_profile.END)
    text = results.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| LM head |" in text


@pytest.mark.slow
def test_reward_profile_splits_both_steps_into_the_same_categories_and_rewrites_only_its_table(tmp_path):
    from benchmarks import ours, reward_profile

    w = wl.Workload("reward", "minilm", batch=2, prompt=0, response=8)
    ours.prepare(w, tmp_path)
    results = {"jaxrlhf (XLA)": reward_profile.ours_ops(tmp_path, 1, w),
               "PyTorch": reward_profile.reference_ops(tmp_path, 1, w)}
    names = [c for c, *_ in reward_profile.CATEGORIES]
    for side, result in results.items():
        assert set(result["ops"]) <= set(names) and result["wall_ms"] > 0, side
        for category in ("dense matmuls", "LayerNorm", names[3], "GELU", "embeddings"):
            assert result["ops"][category] > 0, (side, category)
    # MiniLM: 6 layers of 4 x 384^2 + 2 x 384 x 1536 weights, 16 tokens, forward and two gradients
    assert results["jaxrlhf (XLA)"]["dense_flops"] == 6 * 16 * 6 * (4 * 384 ** 2 + 2 * 384 * 1536)

    path = tmp_path / "RESULTS.md"
    path.write_text(f"before\n{reward_profile.START}\nOLD TABLE\n{reward_profile.END}\nafter\n")
    profiling.write(reward_profile.table(results, 10 ** 9), path, reward_profile.START, reward_profile.END)
    text = path.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "OLD TABLE" not in text
    assert "| dense matmuls |" in text


HLO = """
%fused_transpose (param_0: f32[2,3]) -> f32[3,2] {
  %param_0 = f32[2,3]{1,0} parameter(0)
  %transpose.1 = f32[3,2]{1,0} transpose(%param_0), dimensions={1,0}
  ROOT %copy.1 = f32[3,2]{0,1} copy(%transpose.1)
}

%fused_softmax_grad (param_0.1: f32[2,3]) -> f32[3,2] {
  %param_0.1 = f32[2,3]{1,0} parameter(0)
  %multiply.1 = f32[2,3]{1,0} multiply(%param_0.1, %param_0.1)
  ROOT %transpose.2 = f32[3,2]{1,0} transpose(%multiply.1), dimensions={1,0}
}

ENTRY %main (x: f32[2,3]) -> f32[3,2] {
  %x = f32[2,3]{1,0} parameter(0)
  %copy_bitcast_fusion = f32[3,2]{1,0} fusion(%x), kind=kLoop, calls=%fused_transpose, metadata={op_name="a/attention/transpose"}
  %copy_bitcast_fusion.1 = f32[3,2]{1,0} fusion(%x), kind=kLoop, calls=%fused_softmax_grad, metadata={op_name="a/attention/mul"}
  ROOT %copy.2 = f32[3,2]{0,1} copy(%copy_bitcast_fusion.1)
}
"""


@pytest.mark.fast
def test_profiles_count_only_data_movement_as_copies_and_torch_ops_by_their_outermost_caller():
    from types import SimpleNamespace

    from benchmarks import reward_profile as rp

    # XLA names fusions after their ops: a softmax gradient fused with a transpose is no copy
    moves = profiling.layout_only(HLO)
    assert "copy_bitcast_fusion" in moves and "copy.2" in moves and "copy_bitcast_fusion.1" not in moves
    assert profiling.hlo_op_names(HLO)["copy_bitcast_fusion.1"] == "a/attention/mul"
    copies, attention = rp.CATEGORIES[1][0], rp.CATEGORIES[3][0]
    assert rp.xla_category("jit(step)/bert/layer_2/attention/transpose", "copy_bitcast_fusion", True) == copies
    assert rp.xla_category("jit(step)/bert/layer_2/attention/mul", "copy_bitcast_fusion.1", False) == attention
    assert rp.xla_category("jit(step)/bert/layer_0/ffn_in/ffn_in/dot_general", "ynn_fusion.3", False) == "dense matmuls"

    def op(*names):  # innermost first, each called by the next
        event = None
        for name in reversed(names):
            event = SimpleNamespace(name=name, cpu_parent=event)
        return event

    sdpa_backward = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    assert rp.torch_category(op("aten::fill_", "aten::zero_", "aten::zeros", sdpa_backward,
                                "ScaledDotProductFlashAttentionForCpuBackward0")) == attention
    assert rp.torch_category(op("aten::copy_", "aten::addmm", "aten::linear")) == "dense matmuls"
    assert rp.torch_category(op("aten::copy_", "aten::clone", "aten::contiguous")) == copies
    assert rp.torch_category(op("aten::mul", "aten::mse_loss_backward", "MseLossBackward0")) == rp.LAST
    assert rp.torch_category(op("aten::_fused_adamw_", "Optimizer.step#AdamW.step")) == rp.LAST
    assert rp.torch_category(op("aten::add")) == rp.OTHER
