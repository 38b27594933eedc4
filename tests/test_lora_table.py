"""The LoRA benchmark (benchmarks/lora_table.py) runs end to end on a tiny model, so it cannot
rot. Speed is reported, never asserted."""

import json

import pytest

from benchmarks import lora_table
from benchmarks.memory_table import cells

pytestmark = pytest.mark.fast

TINY = dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=32768, n_positions=64, bos_token_id=0,
            eos_token_id=0)


def test_sft_rows_compare_full_fine_tuning_with_the_adapters_alone(tmp_path):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY))
    full, lora = (cells(r) for r in lora_table.rows(str(model), "sft", 1, ["max_length=8"]))

    assert (full[2], lora[2]) == ("full", "LoRA r16 all-linear")
    # Rank 16 on every linear layer of the one block: c_attn 32->96, c_proj 32->32, c_fc 32->128, c_proj 128->32.
    assert lora[3] == f"{16 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)):,}"
    assert int(full[3].replace(",", "")) > 100_000
    resident, peak = 4, 6
    assert float(lora[resident].replace(",", "")) < float(full[resident].replace(",", ""))
    assert float(full[peak].replace(",", "")) >= float(full[resident].replace(",", ""))
