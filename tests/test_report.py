"""What a finished run prints: built from recorded events only, short enough to read."""

from rich.console import Console

from fedpriv.common.run_events import CentralEvaluate, RoundEnd, SiteTrain
from fedpriv.common.rundir import RunDirectory
from fedpriv.server.report import print_summary, shown_rounds, summary_tables


def _cells(table, column: int) -> list[str]:
    return list(table.columns[column]._cells)


def _distributed_run(tmp_path, rounds: int) -> RunDirectory:
    """Events as a secure-aggregation run records them: no site sends its row count."""
    run = RunDirectory.create(tmp_path / "run")
    for rnd in range(1, rounds + 1):
        for site in ("site-000", "site-001"):
            run.log(SiteTrain(round=rnd, site=site, epsilon=rnd / 30, delta=1e-5))
        accuracy = 0.9 if rnd == 100 else min(0.5 + rnd / 1000, 0.85)
        run.log(CentralEvaluate(round=rnd, accuracy=accuracy))
        run.log(RoundEnd(round=rnd, seconds=0.1))
    return run


def test_a_long_run_shows_a_compact_accuracy_table_and_no_made_up_row_counts(tmp_path):
    run = _distributed_run(tmp_path, 241)
    rounds, sites = summary_tables(run)
    shown = _cells(rounds, 0)
    # 241 rows once; now the first three, one every 50, the best and the last.
    assert shown == ["1", "2", "3", "50", "100 (best)", "150", "200", "241"]
    assert "8 of 241 rounds" in rounds.caption and "fedpriv report --every-round" in rounds.caption
    assert _cells(rounds, 1)[4] == "90.00%"
    # The row counts were never sent: the table says so instead of showing 0.
    assert _cells(sites, 1) == ["not sent", "not sent"]
    assert "does not send its row count" in sites.caption
    everything, _ = summary_tables(run, every_round=True)
    assert everything.row_count == 241 and everything.caption is None
    console = Console(record=True, width=200)
    print_summary(run, console)
    assert "Final test accuracy: 74.10%" in console.export_text()


def test_a_short_run_shows_every_round_and_the_row_counts_sent():
    assert shown_rounds(list(range(1, 13)), best=5) == (list(range(1, 13)), 1)
    assert shown_rounds(list(range(1, 41)), best=None)[0] == [1, 2, 3, 10, 20, 30, 40]


def test_row_counts_a_site_sent_are_shown(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    run.log(SiteTrain(round=1, site="site-000", epsilon=1.0, delta=1e-5, **{"num-examples": 120}))
    run.log(CentralEvaluate(round=1, accuracy=0.5))
    _, sites = summary_tables(run)
    assert _cells(sites, 1) == ["120"] and "row count" not in sites.caption
