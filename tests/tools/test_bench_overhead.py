"""monitor_overhead and audit_overhead: warm-up runs first and untimed, alternating order, what the verdict uses.

No timing assertions: the runs are replaced by fakes that record the schedule and return chosen times.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lp_lightning.tools.bench import audit_overhead, monitor_overhead


def test_schedule_warms_up_each_variant_then_alternates() -> None:
    assert audit_overhead.interleaved_schedule(["plain", "audit"], 3) == [
        ("warm-up", "plain"), ("warm-up", "audit"),
        (0, "plain"), (0, "audit"), (1, "audit"), (1, "plain"), (2, "plain"), (2, "audit")]
    assert audit_overhead.interleaved_schedule(["p", "m"], 2, warmup=False) == [(0, "p"), (0, "m"), (1, "m"), (1, "p")]


def test_audit_verdict_uses_fit_test_time_without_warmup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []

    def fake_run_once(extra: list[str], out: Path, threads: int | None) -> dict[str, float]:
        calls.append((out.name, *extra))
        audit = "callbacks=audit" in extra
        if out.name.endswith("warm-up"):  # a slow warm-up must not count
            return {"process_s": 100.0, "fit_test_s": 90.0, "audit_s": 0.0, "test_acc": 1.0}
        # start-up (10 s) dilutes the process ratio to 1.05; fit+test says 1.20
        return {"process_s": 21.0 if audit else 20.0, "fit_test_s": 6.0 if audit else 5.0,
                "audit_s": 0.5 if audit else 0.0, "test_acc": 1.0}

    monkeypatch.setattr(audit_overhead, "run_once", fake_run_once)
    out = tmp_path / "audit.json"
    summary = audit_overhead.main(["--repeats", "2", "--threads", "1", "--out", str(out),
                                   "--audit-override", "callbacks.audit.plot=false", "trainer.max_epochs=1"])
    assert [c[0] for c in calls] == ["plain_warm-up", "audit_warm-up", "plain_0", "audit_0", "audit_1", "plain_1"]
    assert all(c[-1] == "trainer.max_epochs=1" for c in calls)
    assert all(("callbacks.audit.plot=false" in c) == c[0].startswith("audit") for c in calls)  # audit variant only
    assert summary["verdict_measure"] == "fit_test_s" and summary["ratio"] == pytest.approx(1.2)
    assert summary["process_s"]["ratio"] == pytest.approx(1.05) and not summary["ok"]
    assert summary["in_run"] == pytest.approx(0.5 / 5.5)
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and set(saved["warmup_runs"]) == {"plain", "audit"}
    assert len(saved["runs"]["plain"]) == len(saved["runs"]["audit"]) == 2


def test_monitor_warms_up_alternates_and_records_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    order: list[str] = []

    def fake_time_run(overrides: list[str], run_dir: Path) -> tuple[float, float, float]:
        order.append(run_dir.name)
        if run_dir.name.endswith("warm-up"):
            return 50.0, 50.0, 1.0
        monitored = any(o.startswith("callbacks.numerics_monitor") for o in overrides)
        return (11.0, 5.5, 1.0) if monitored else (10.0, 5.0, 1.0)

    monkeypatch.setattr(monitor_overhead, "_time_run", fake_time_run)
    before = torch.get_num_threads()
    out = tmp_path / "overhead.json"
    result = monitor_overhead.main(["--repeats", "3", "--threads", "1", "--out", str(out)])
    assert torch.get_num_threads() == before  # restored for the caller
    assert order == ["plain_warm-up", "monitored_warm-up", "plain_0", "monitored_0", "monitored_1", "plain_1",
                     "plain_2", "monitored_2"]
    assert result["threads"] == 1 and result["ratio"] == pytest.approx(1.1) and result["ok"]
    assert result["times_s"] == {"plain": [10.0] * 3, "monitored": [11.0] * 3}  # warm-up runs excluded
    assert json.loads(out.read_text())["warmup_s"] == {"plain": [50.0, 50.0], "monitored": [50.0, 50.0]}
