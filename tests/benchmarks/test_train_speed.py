"""``benchmarks/train_speed.py``: which variants are timed, and what a variant that runs out of time prints."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.benchmarks import load_benchmark

train_speed = load_benchmark("train_speed")
ALL = ["fp32", "fp32+cl", "bf16", "bf16+cl"]


def test_emulated_bf16_variants_are_skipped_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_speed.select_variants(ALL, native_bf16=False, force_bf16=False) == ["fp32", "fp32+cl"]
    assert "skipping bf16, bf16+cl" in capsys.readouterr().err


@pytest.mark.parametrize(("native", "force"), [(True, False), (False, True), (True, True)])
def test_bf16_variants_are_timed_where_native_or_forced(native: bool, force: bool) -> None:
    assert train_speed.select_variants(ALL, native_bf16=native, force_bf16=force) == ALL


def test_only_bf16_requested_on_an_emulating_cpu_times_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_speed, "cpu_has_native_bf16", lambda: False)
    assert train_speed.main(["--variants", "bf16"]) == 1


def test_a_variant_out_of_time_is_reported_not_hung(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        variant = cmd[cmd.index("--worker") + 1]
        if variant == "fp32+cl":
            assert kwargs["timeout"] == 5.0
            raise subprocess.TimeoutExpired(cmd, 5.0)
        out = json.dumps(
            {"variant": variant, "medians": [2.0, 2.2, 2.1], "batch_shape": [4, 3, 64, 64, 48], "threads": 2}
        )
        return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")

    monkeypatch.setattr(train_speed.subprocess, "run", fake_run)
    assert train_speed.main(["--variants", "fp32", "fp32+cl", "--timeout", "5"]) == 0
    captured = capsys.readouterr()
    assert "| fp32 | 2.100 | 0.48 | 1.00x |" in captured.out
    assert "| fp32+cl | not finished in 5 s | - | - |" in captured.out
    assert "fp32+cl: not finished within --timeout 5 s" in captured.err


def test_a_failing_worker_shows_its_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(1, cmd, output="", stderr="Traceback ...\nValueError: channels (3) ...\n")

    monkeypatch.setattr(train_speed.subprocess, "run", fake_run)
    assert train_speed.main(["--variants", "fp32", "--", "--data.batch_size=0"]) == 1
    assert (
        "fp32: the worker failed (exit status 1):\nTraceback ...\nValueError: channels (3) ..."
        in capsys.readouterr().err
    )


def test_compare_times_the_config_as_is_and_with_the_overrides(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd[cmd.index("--") + 1 :])
        medians = [1.0, 1.0, 1.0] if calls[-1] else [2.0, 2.0, 2.0]  # the overrides halve the step
        out = json.dumps({"variant": "fp32+cl", "medians": medians, "batch_shape": [2, 3, 8, 8, 8], "threads": 2})
        return subprocess.CompletedProcess(cmd, 0, stdout=out + "\n", stderr="")

    monkeypatch.setattr(train_speed.subprocess, "run", fake_run)
    assert train_speed.main(["--variants", "fp32+cl", "--compare", "--", "--data.samples_per_scan=1"]) == 0
    assert calls == [[], ["--data.samples_per_scan=1"]]
    out = capsys.readouterr().out
    assert "| variant | s/step (median) | steps/s | speed-up vs fp32+cl |" in out
    assert "| fp32+cl | 2.000 | 0.50 | 1.00x |" in out
    assert "| fp32+cl + overrides | 1.000 | 1.00 | 2.00x |" in out
