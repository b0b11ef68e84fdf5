"""`fedpriv dashboard`: the page of a real tiny run, its live updates, and who may read it.

The run is a real simulation of five sites under secure aggregation with distributed noise, where one site's
own policy refuses the run's collusion bound and another's budget runs out after one round. The page is read
by a real headless Chromium (Playwright driving the system's browser); without one these tests skip, except
in CI (FEDPRIV_REQUIRE_BROWSER=1), which installs one.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tomli_w

from tests.helpers import LABELS, easy_rows, fedpriv_here, write_csv
from tests.local_federation import free_ports

# One worker runs them all, so the tiny run they share is made once.
pytestmark = pytest.mark.xdist_group("test_dashboard")

REFUSER, CAPPED = "site-004", "site-000"
ROUNDS = 3
# Bounds a hang, never paces a test: every wait ends as soon as what it waits for is there.
WAIT = 120.0


def _config(tiny_model_dir: str, folder: Path):
    from fedpriv.common.config import load_config

    train = write_csv(folder / "train.csv", easy_rows(400, seed=1))
    test = write_csv(folder / "test.csv", easy_rows(90, seed=2))
    labels = folder / "labels.json"
    labels.write_text(json.dumps(LABELS), encoding="utf-8")
    return load_config(None, [], "distributed").replace(
        **{
            "model.name": tiny_model_dir,
            "data.path": str(train),
            "data.test-path": str(test),
            "data.labels": str(labels),
            "data.max-length": 32,
            "rounds": ROUNDS,
            "simulation.sites": 5,
            "simulation.partitioner": "iid",
            "strategy.min-sites": 5,
            "simulation.backend": "in-process",
            # One round costs about 4.2 at these settings, two about 5.8: the capped site trains once.
            "simulation.site-caps": f"{CAPPED}=5",
            # A real site's policy: it assumes two colluders where the run plans for one.
            "simulation.site-policies": f"{REFUSER}: min-colluding-sites=2",
        }
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dashboard")
    config = _config(tiny_model_dir, folder).replace(**{"run-dir": str(folder / "run")})
    path = folder / "fedpriv.toml"
    path.write_text(tomli_w.dumps(config.model_dump(by_alias=True)), encoding="utf-8")
    result = fedpriv_here("simulate", "--config", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder / "run"


def _lines(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# -- what the page is built from -------------------------------------------------------------


@pytest.mark.slow
def test_the_view_of_a_real_run_shows_each_sites_state_budget_and_the_secure_rounds(tiny_run):
    from fedpriv.dashboard.view import RunView

    view = RunView(tiny_run)
    assert view.refresh()
    state = view.snapshot()
    assert state["status"] == "finished" and state["rounds-done"] == state["rounds-planned"] == ROUNDS
    assert not state["deployed"] and state["skipped-lines"] == 0
    sites = {s["name"]: s for s in state["sites"]}
    assert sites[REFUSER]["state"] == "refused" and "fewer than its own bound 2" in sites[REFUSER]["reason"]
    assert sites[REFUSER]["epsilon"] is None  # it never released anything
    capped = sites[CAPPED]
    assert capped["state"] == "exhausted" and capped["cap"] == 5.0
    assert len(capped["epsilon-by-round"]) == 1 and capped["epsilon"] <= capped["cap"]
    for name in ("site-001", "site-002", "site-003"):
        assert sites[name]["state"] == "trained" and len(sites[name]["epsilon-by-round"]) == ROUNDS
        assert 0 < sites[name]["epsilon"] <= sites[name]["cap"] == 8.0
    # Every epsilon shown is one the run recorded for that site and round.
    recorded = {(e["site"], e["round"]): e["epsilon"] for e in map(json.loads, _lines(tiny_run)) if "epsilon" in e}
    for site in state["sites"]:
        assert all(recorded[(site["name"], r)] == eps for r, eps in site["epsilon-by-round"])
    rounds = {r["round"]: r for r in state["rounds"]}
    # Round 1: the refusing site declines, the keys are agreed again among the four others (threshold 3).
    assert rounds[1]["refused"] == 1 and rounds[1]["cohort"] == 4 and rounds[1]["threshold"] == 3
    assert rounds[1]["aggregated"] == 4 and rounds[1]["secure-dropped"] == 0
    # Round 2: the capped site is out of budget at the mask stage: one dropout the threshold tolerates.
    assert rounds[2]["exhausted"] == 1 and rounds[2]["aggregated"] == 3 and rounds[2]["secure-dropped"] == 1
    assert len(state["central-accuracy"]) == ROUNDS + 1 and not state["federated-accuracy"]
    assert any("Distributed noise under secure aggregation" in p for p in state["privacy"])
    assert state["audit"]["verdict"] == "auditing"  # made apart from the view's reading (seconds on a long run)
    view.make_audit()
    assert view.snapshot()["audit"]["verdict"] == "passed"
    assert not view.refresh()  # nothing new: nothing to send


def test_the_view_reads_only_complete_new_lines_and_skips_a_damaged_one(tmp_path):
    from fedpriv.common.run_events import (
        Resumed,
        RoundEnd,
        RoundStart,
        RunStart,
        SiteError,
        SiteRefused,
        SiteRejected,
        SiteTrain,
    )
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.dashboard.view import RunView

    run = RunDirectory(tmp_path / "run")
    view = RunView(run.path)
    assert view.snapshot()["status"] == "waiting" and not view.refresh()  # nothing written yet
    run.path.mkdir()
    run.log(RunStart(run_id=7, rounds=2))
    run.log(RoundStart(round=1, rounds=2, global_sha256="0" * 64))
    assert view.refresh() and view.snapshot()["status"] == "running"
    line = json.dumps({"kind": "round-end", "time": 1.0, "round": 1, "seconds": 2.5})
    with open(run.metrics_path, "a", encoding="utf-8") as handle:
        handle.write(line[:20])  # a writer part-way through a line
    before = view.version
    assert not view.refresh() and view.version == before and view.snapshot()["rounds-done"] == 0
    with open(run.metrics_path, "a", encoding="utf-8") as handle:
        handle.write(line[20:] + "\n" + '{"kind": "round-end", "round": "one"}\n')
    assert view.refresh()
    state = view.snapshot()
    assert state["rounds-done"] == 1 and state["seconds-per-round"] == [[1, 2.5]] and state["skipped-lines"] == 1
    # Round 2 is cut short (one site trained) and started again when the run resumes: its second start counts.
    run.log(RoundStart(round=2, rounds=2, global_sha256="1" * 64))
    run.log(SiteTrain(round=2, site="site-d", epsilon=0.5))
    run.log(Resumed(round=2))
    run.log(RoundStart(round=2, rounds=2, global_sha256="1" * 64))
    # Round 2: one site's reply rejected at admission, one lost, one refused at one stage and lost at the next.
    run.log(SiteRejected(round=2, site="site-a", reason="update norm 812 exceeds strategy.max-update-norm 100"))
    run.log(SiteError(round=2, site="site-b", reason="node went away", phase="secagg_mask"))
    run.log(SiteRefused(round=2, site="site-c", reason="site-c refuses: below its minimum", phase="secagg_advertise"))
    run.log(SiteError(round=2, site="site-c", reason="timeout", phase="secagg_mask"))
    run.log(RoundEnd(round=2, seconds=1.5))
    view.refresh()
    state = view.snapshot()
    assert state["rounds-done"] == 2 and state["mean-round-seconds"] == 2.0
    sites = {s["name"]: (s["state"], s["reason"]) for s in state["sites"]}
    assert sites["site-a"] == ("rejected", "update norm 812 exceeds strategy.max-update-norm 100")
    assert sites["site-b"] == ("dropped", "node went away (at secagg_mask)")
    assert sites["site-c"][0] == "refused"  # the worse news of the round stays
    assert {k: state["rounds"][0][k] for k in ("rejected", "dropped", "refused")} == {
        "rejected": 1,
        "dropped": 2,
        "refused": 1,
    }


def test_an_aggregators_state_folder_shows_its_newest_run_and_follows_the_next(tmp_path):
    from fedpriv.common.run_events import RunStart
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.dashboard.view import DashboardError, open_view

    state = tmp_path / "aggregator-state"
    (state / "runs").mkdir(parents=True)
    view = open_view(state)
    assert view.snapshot()["status"] == "waiting"
    first = RunDirectory(state / "runs" / "20261204-100000")
    first.path.mkdir()
    first.log(RunStart(run_id=1, rounds=3))
    view.refresh()
    assert view.snapshot()["run-id"] == "1" and view.snapshot()["state-folder"] == str(state.resolve())
    second = RunDirectory(state / "runs" / "20261204-110000")
    second.path.mkdir()
    second.log(RunStart(run_id=2, rounds=5))
    os.utime(second.metrics_path, ns=(time.time_ns() + 10**9,) * 2)  # written after the first
    view.refresh()
    assert view.snapshot()["run-id"] == "2" and view.snapshot()["rounds-planned"] == 5
    some_file = tmp_path / "notes.txt"
    some_file.write_text("x")
    with pytest.raises(DashboardError, match="notes.txt: not a run directory"):
        open_view(some_file)
    result = fedpriv_here("dashboard", str(some_file))
    assert result.returncode == 2 and "not a run directory" in result.stderr


# -- who may read it -------------------------------------------------------------------------------


def test_only_loopback_is_served_without_a_token_and_a_token_is_checked(tmp_path):
    from fedpriv.dashboard.server import Dashboard, is_loopback
    from fedpriv.dashboard.view import DashboardError, RunView

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(DashboardError, match="needs a token"):
        Dashboard(RunView(tmp_path), host="0.0.0.0")
    # The token check itself, on loopback (tests open no other address).
    (port,) = free_ports(1)
    served = Dashboard(RunView(tmp_path), port=port, token="s3cret-token")
    url = served.start()
    try:
        assert url.endswith("/?token=s3cret-token")
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/api/state", "/api/events", "/audit"):
            code, body = _get(base + path)
            assert code == 401 and "needs its token" in body, path
        assert _get(base + "/api/state?token=wrong")[0] == 401
        code, body = _get(base + "/api/state?token=s3cret-token")
        assert code == 200 and json.loads(body)["status"] == "waiting"
        request = urllib.request.Request(base + "/", headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert "fedpriv dashboard" in response.read().decode()
        # The run has not ended: there is no audit to show yet.
        assert _get(base + "/audit?token=s3cret-token")[0] == 404
    finally:
        served.close()
    # A port in use is said plainly.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DashboardError, match="cannot listen"):
            Dashboard(RunView(tmp_path), port=taken.getsockname()[1]).start()


# -- the page, in a real browser -------------------------------------------------------------------


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    executable = _browser_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        missing = "no Chromium on this machine" if executable is None else "playwright is not installed"
        if os.environ.get("FEDPRIV_REQUIRE_BROWSER"):
            pytest.fail(f"{missing}, and FEDPRIV_REQUIRE_BROWSER is set (CI installs one)")
        pytest.skip(f"{missing} (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def _replay(lines: list[str], into: Path, upto: str, count: int = 1) -> None:
    """Appends the recorded lines up to the `count`-th event of kind `upto`, as the run wrote them."""
    written = len(_lines(into)) if (into / "metrics.jsonl").exists() else 0
    seen = sum(1 for line in lines[:written] if json.loads(line)["kind"] == upto)
    with open(into / "metrics.jsonl", "a", encoding="utf-8") as handle:
        for line in lines[written:]:
            handle.write(line)
            handle.flush()
            if json.loads(line)["kind"] == upto:
                seen += 1
                if seen >= count:
                    return


@pytest.mark.slow
def test_the_page_updates_as_rounds_end_and_shows_a_refusal_an_exhausted_budget_and_the_audit(
    tiny_run, browser, tmp_path
):
    from fedpriv.dashboard.server import Dashboard
    from fedpriv.dashboard.view import RunView

    # The run's own records, replayed as it wrote them into a copy the page watches.
    lines = _lines(tiny_run)
    live = tmp_path / "run"
    shutil.copytree(tiny_run, live, ignore=shutil.ignore_patterns("metrics.jsonl", "audit.html"))
    (port,) = free_ports(1)
    served = Dashboard(RunView(live), port=port)
    page = browser.new_page()
    try:
        served.start()
        _replay(lines, live, "round-end", 1)
        page.goto(served.url)
        page.wait_for_function("document.getElementById('rounds-done').textContent === '1'", timeout=WAIT * 1000)
        assert page.text_content("#status") == "running" and page.text_content("#rounds-planned") == str(ROUNDS)
        page.evaluate("window.loadedOnce = true")  # gone if the page were loaded again
        refused = page.locator(f"#sites tr[data-site='{REFUSER}']")
        assert refused.get_attribute("data-state") == "refused"
        assert "fewer than its own bound 2" in refused.inner_text()

        _replay(lines, live, "round-end", 2)  # round 2 ends while the page is open
        page.wait_for_function("document.getElementById('rounds-done').textContent === '2'", timeout=WAIT * 1000)
        assert page.evaluate("window.loadedOnce") is True
        capped = page.locator(f"#sites tr[data-site='{CAPPED}']")
        assert capped.get_attribute("data-state") == "exhausted" and "budget spent" in capped.inner_text()
        assert "5.00" in capped.inner_text()  # its cap, beside what it spent
        assert "cohort 4, dropped 1, threshold 3" in page.locator("#rounds tr[data-round='2']").inner_text()

        _replay(lines, live, "run-end")
        page.wait_for_function(
            "document.getElementById('audit-verdict').dataset.verdict === 'passed'", timeout=WAIT * 1000
        )
        assert page.text_content("#status") == "finished" and page.evaluate("window.loadedOnce") is True
        assert "every epsilon reproduced" in page.text_content("#audit-detail")
        assert "Distributed noise under secure aggregation" in page.text_content("#privacy")
        assert page.locator("#accuracy-chart path").count() == 1  # central accuracy; no federated metrics
        assert page.locator("#epsilon-chart path").count() == 4  # every site that released something

        report = browser.new_page()
        report.goto(f"http://127.0.0.1:{port}/{page.locator('#audit-link').get_attribute('href')}")
        assert "passed" in report.text_content("body")
        report.close()

        served.close()  # the page is told the server stopped, and keeps what it shows
        page.wait_for_function(
            "document.getElementById('connection').textContent.includes('stopped')", timeout=WAIT * 1000
        )
        assert page.text_content("#rounds-done") == str(ROUNDS)
    finally:
        page.close()
        served.close()


@pytest.mark.slow
def test_simulate_with_dashboard_serves_the_run_live_and_sends_the_final_state_before_it_stops(
    tiny_model_dir, tmp_path
):
    config = _config(tiny_model_dir, tmp_path).replace(**{"run-dir": str(tmp_path / "run"), "rounds": 2})
    path = tmp_path / "fedpriv.toml"
    path.write_text(tomli_w.dumps(config.model_dump(by_alias=True)), encoding="utf-8")
    (port,) = free_ports(1)
    result: dict = {}
    simulation = threading.Thread(
        target=lambda: result.update(
            run=fedpriv_here("simulate", "--config", str(path), "--dashboard", "--dashboard-port", str(port))
        )
    )
    simulation.start()
    # The page is served before the run starts: connect as soon as the port accepts.
    deadline = time.monotonic() + WAIT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            break
        except OSError:
            assert simulation.is_alive() and time.monotonic() < deadline, result.get("run")
            time.sleep(0.05)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request("GET", "/api/events")
    stream = connection.getresponse()
    assert stream.status == 200 and stream.getheader("content-type").startswith("text/event-stream")
    states, ended = [], False
    for raw in stream:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: {}":
            states.append(json.loads(line[6:]))
        elif line == "event: end":
            ended = True
            break
    connection.close()
    simulation.join(timeout=WAIT)
    run = result["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Dashboard: http://127.0.0.1:{port}/" in run.stdout
    # The stream ended by saying so, after the state of the finished run (its audit included).
    assert ended and states[-1]["status"] == "finished" and states[-1]["rounds-done"] == 2
    assert states[-1]["path"] == str(tmp_path / "run") and states[-1]["audit"]["verdict"] == "passed"
    assert [s["version"] for s in states] == sorted({s["version"] for s in states})  # each state sent once
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # and it stopped
