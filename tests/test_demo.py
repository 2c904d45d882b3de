"""``m2d demo --quick``: the demo's whole path end to end, its report, plots and tables."""

import json
import math

import pytest

from m2d_jax import demo
from m2d_jax.cli import main as m2d_main
from m2d_jax.config_utils import load_config
from m2d_jax.scoring import SCORINGS


def test_demo_rejects_unknown_teachers_before_any_work(tmp_path):
    config = load_config("demo_quick")
    config.teachers, config.workdir = "trained_elsewhere", str(tmp_path / "out")
    with pytest.raises(ValueError, match="config field teachers"):
        demo.run_demo(config)
    assert not (tmp_path / "out").exists()


def test_demo_refuses_an_existing_workdir(tmp_path):
    config = load_config("demo_quick")
    config.workdir = str(tmp_path)  # exists: refused before any work without overwrite
    with pytest.raises(FileExistsError):
        demo.run_demo(config)


def _teachers_shipped() -> bool:
    from m2d_jax.data.teachers import TEACHERS, teacher_dir
    from m2d_jax.errors import DataError

    try:
        return all(teacher_dir(name) for name in TEACHERS)
    except DataError:
        return False


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    """On the shipped teachers when this checkout has them, else on the tiny random ones (the report says which)."""
    out = tmp_path / "demo"
    teachers = "shipped" if _teachers_shipped() else "random"
    assert m2d_main(["demo", "--quick", f"--config.workdir={out}", f"--config.teachers={teachers}"]) == 0
    text = capsys.readouterr().out
    assert "demo: PASSED" in text and "dispatch=capacity" in text and "FAILED" not in text
    results = json.loads((out / demo.RESULTS).read_text())
    assert results["teachers"]["source"] == teachers
    assert all(results["checks"].values()) and set(results["checks"]) >= {
        "teacher_parity_dense", "teacher_parity_ragged", "student_export_parity", "distillation_lowers_ppl"}
    pre = results["pre_distillation_ppl"]
    rows = {demo.MOE_TEACHER, demo.DENSE_TEACHER, "random-FFN", "D2D"} | {demo.SCORING_LABELS[s] for s in SCORINGS}
    assert set(pre) == rows and all(math.isfinite(v) and v > 1 for v in pre.values())
    students = results["distillation"]["students"]
    assert set(students) == {"DO-ACP", "SF", "random-FFN", "D2D"} and students["D2D"]["teacher"] == demo.DENSE_TEACHER
    for r in students.values():
        assert r["curve"][0] == [0, r["ppl_before"]] and r["curve"][-1] == [30, r["ppl_after"]]
        assert 0 <= r["choice_accuracy"] <= 1
    params = results["params"]  # the D2D baseline has the converted students' parameter count (+-1%)
    assert abs(params["D2D"] - params["DO-ACP"]) <= 0.01 * params["DO-ACP"]
    assert all(s["tokens_per_s"] > 0 for s in (results["step_time"][demo.MOE_TEACHER],
                                                results["step_time"][demo.DENSE_TEACHER]))
    report = (out / demo.REPORT).read_text()
    assert all(f"| {row} |" in report for row in rows) and "| ms / step |" in report
    for plot in (demo.PLOT_PRE, demo.PLOT_CURVES):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in report
