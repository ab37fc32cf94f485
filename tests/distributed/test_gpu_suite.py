"""The GPU suite's dry run (`python bench/gpu_suite.py run --dry_run`): every part runs at toy shapes on the CPU
and reports every figure, so the suite is known to run before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.distributed


def test_every_part_of_the_gpu_suite_runs_and_reports_its_figures(tmp_path):
    from bench.gpu_suite import PARTS

    command = [sys.executable, "bench/gpu_suite.py", "run", "--dry_run", f"--work_dir={tmp_path}",
               f"--assets={tmp_path / 'assets'}"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    measured = {(row["part"], row["method"]): row for row in summary["runs"]}
    expected = {(part.name, method) for part in PARTS for method in part.estimates}
    assert set(measured) == expected and not summary["skipped"]
    for key, row in measured.items():
        assert "error" not in row, (key, row)
        assert row["tokens_per_s"] > 0 and row["peak_memory_gb"] > 0 and 0 < row["mfu_measured_matmul"], key
    planned = [row for row in measured.values() if row["kind"] == "toolkit" and row["method"] in ("kd", "cka")]
    assert len(planned) == 4 and all(row["planned_peak_gb"] > 0 for row in planned)  # ds-distill plan's peaks
    assert measured["replicated", "cache"]["cache_bytes_per_token"] > 0
    compiled = measured["toolkit_compiled", "kd_compiled"]
    assert set(compiled["phase_ms"]) == {"data", "teacher_forward", "student_forward_and_losses", "backward",
                                         "optimizer_step"}  # fmt: skip
    assert (tmp_path / compiled["profile_table"]).read_text().strip()
    assert "| toolkit | replicated | students |" in (tmp_path / "results.md").read_text()
