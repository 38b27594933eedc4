"""The benchmark harness runs (in its --quick form) so it cannot rot; speed is not asserted."""

from benchmarks import generation


def test_generation_benchmark_quick_mode_runs(tmp_path):
    rows = generation.main(["--quick", "--write", str(tmp_path / "results.md")])
    assert [row[0] for row in rows] == ["tiny (2x128)"]
    text = (tmp_path / "results.md").read_text()
    assert "python benchmarks/generation.py --quick" in text and "| tiny (2x128) |" in text
