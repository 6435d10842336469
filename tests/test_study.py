"""`er-ray study` on a small configuration (MiniLM, trec, one seed, one cut layer): REPORT.md's numbers come from
the runs' own metrics.json."""

import json

import pyarrow.parquet as pq

from er_ray.study import StudyOptions, study


def test_study_small_writes_report_from_runs(ray_local, tmp_path):
    out = tmp_path / "study"
    opts = StudyOptions(model=["minilm"], task=["trec"], seed=[0], cut_layer=[3], adapter_size=[4], epochs=1,
                        batch_size=16, max_length=48, max_train_examples=200, output=str(out))
    study(opts)
    runs = pq.read_table(out / "study.parquet").to_pylist()
    # fine-tuning + one recycled run that is both the best at L/2 and the sweep's best (trained once)
    assert sorted(r["variant"] for r in runs) == ["finetune", "recycled best", "recycled k=L/2"]
    assert len(list((out / "minilm" / "runs").glob("*/metrics.json"))) == 2
    report = (out / "REPORT.md").read_text()
    assert "The paper's headline" in report and "(minilm/sweep/sweep.md)" in report
    for r in runs:
        m = json.loads((out / "minilm" / "runs" / r["run"] / "metrics.json").read_text())
        assert r["test"] == m["test"] and r["seconds_per_epoch"] == m["seconds_per_epoch"]
        assert f"{m['test']:.4f}" in report  # the table shows the run's own test score
    ft = next(r for r in runs if r["variant"] == "finetune")
    rec = next(r for r in runs if r["variant"] == "recycled k=L/2")
    assert ft["cut_layer"] == 0 and rec["cut_layer"] == 3 and rec["adapter"] == "lora"
    assert f"{ft['seconds_per_epoch'] / rec['seconds_per_epoch']:.2f}x" in report
    png = out / "plots" / "minilm-study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running reads every finished run and trains nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "minilm" / "runs").glob("*/metrics.json")}
    study(opts)
    assert {p: p.stat().st_mtime_ns for p in (out / "minilm" / "runs").glob("*/metrics.json")} == before
