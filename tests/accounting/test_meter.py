"""Reported totals never go backwards: a job's counters made again (lost while the agent was down) or
counters reset while it runs continue from the last reported totals (the loss since the last sample is logged,
not hidden)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nodeagent.accounting import NetTotals, Reading, UsageMeter


def t(b: int) -> NetTotals:
    return NetTotals((b, 0, 0, b, 0, 0), (b // 10, 0, 0, b // 10, 0, 0))


def test_normal_readings_pass_through(tmp_path: Path) -> None:
    m = UsageMeter(tmp_path / "bases.json")
    assert m.observe("j", Reading(t(100), 1, "ok")) == t(100)
    assert m.observe("j", Reading(t(250), 2, "ok")) == t(250)
    assert not (tmp_path / "bases.json").exists()


def test_recreated_counters_continue_from_the_last_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = UsageMeter(tmp_path / "bases.json")
    m.observe("j", Reading(t(1000), 1, "ok"))
    with caplog.at_level(logging.ERROR):
        assert m.observe("j", Reading(NetTotals(), 2, "created")) == t(1000)
    assert "lost (created again)" in caplog.text
    assert m.observe("j", Reading(t(30), 3, "ok")) == t(1030)
    again = UsageMeter(tmp_path / "bases.json")  # a restarted agent keeps the base
    assert again.observe("j", Reading(t(40), 4, "ok")) == t(1040)
    again.forget("j")
    assert UsageMeter(tmp_path / "bases.json").observe("j", Reading(t(5), 5, "ok")) == t(5)


def test_reset_counter_continues_per_counter(tmp_path: Path) -> None:
    m = UsageMeter(tmp_path / "bases.json")
    m.observe("j", Reading(NetTotals((500, 70, 0, 0, 0, 0), (5, 1, 0, 0, 0, 0)), 1, "ok"))
    # tx_local was reset (now 20), tx_overlay kept counting (80)
    v = m.observe("j", Reading(NetTotals((20, 80, 0, 0, 0, 0), (1, 2, 0, 0, 0, 0)), 2, "ok"))
    assert v == NetTotals((520, 80, 0, 0, 0, 0), (6, 2, 0, 0, 0, 0))


def test_seeded_after_a_restart(tmp_path: Path) -> None:
    m = UsageMeter(tmp_path / "bases.json")
    m.seed("j", t(900))  # from the spool: the last report before the restart
    assert m.observe("j", Reading(NetTotals(), 1, "created")) == t(900)
