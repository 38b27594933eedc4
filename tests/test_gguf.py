"""GGUF files that cannot be converted are refused at once, in one line naming the file, and a
folder of the user's is refused before the conversion starts (minutes, for a real model)."""

import numpy as np
import pytest

from jaxrlhf.errors import CheckpointError, OutputError

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.fast


@pytest.fixture
def tiny_gguf(tmp_path):
    """A GGUF file of two float32 tensors (a header and 512 + 64 bytes of data, aligned)."""
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_truncated_gguf_is_named_with_both_sizes(tiny_gguf):
    from jaxrlhf.models.gguf import gguf_to_hf

    whole = tiny_gguf.stat().st_size
    tiny_gguf.write_bytes(tiny_gguf.read_bytes()[:-100])  # a download cut short
    with pytest.raises(CheckpointError, match=rf"^{tiny_gguf} is truncated or corrupt: its header describes {whole} "
                                              rf"bytes, the file has {whole - 100} \(100 missing\)$"):
        gguf_to_hf(tiny_gguf, tiny_gguf.parent / "out")
    assert not (tiny_gguf.parent / "out").exists()


def test_gguf_to_hf_refuses_a_folder_of_user_files_before_converting(tiny_gguf, capsys):
    from jaxrlhf.commands import gguf_to_hf_main as main

    out = tiny_gguf.parent / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(tiny_gguf), str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out} already exists and holds files jaxrlhf did not write (notes.txt); choose another path, or "
        "pass --overwrite to replace it"]
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError):  # the pipeline's stage, at --dry-run
        from jaxrlhf.stages import gguf as gguf_stage

        gguf_stage.preflight(gguf_stage.GGUFConfig(output_dir=str(out), gguf=str(tiny_gguf)))
