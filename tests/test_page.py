"""The web page in a real browser: Debian's chromium, driven by playwright.

One sidecar with a token and real workers (one of them reporting HTML in every
string it can), one with 64 workers (one 3x slower, one hung with the GIL
held), one sidecar with --target for the job view, and one browser, all shared
by the module. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, free_port, wait_for, write_token_file
from node import Node
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from system_tools import require_tool
from wire import RawPeer
from workers.hostile_worker import MARKUP

from sidecar.http.page import SCRIPTS

TOKEN = "page-test-token"
# The crowd: 64 ranks on one node, rank 5 three times slower per step than the
# others, and the last one hung in C code with the GIL held, so that its
# heartbeats stop and the verdict names it.
CROWD = 64
SLOW_RANK = 5
HUNG_RANK = CROWD - 1
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("page-token"), TOKEN)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Node]:
    """Rank 0 trains, 1 reports HTML, 2 dies with HTML in its exception, 3 stalls."""
    node = Node(
        tmp_path_factory.mktemp("page"),
        "--token-file", str(token_file),
        "--stall-after", "3",
        "--dump-dir", str(tmp_path_factory.mktemp("page-dumps")),
    ).start()  # fmt: skip
    node.sidecar.client.headers["Authorization"] = f"Bearer {TOKEN}"
    node.spawn("train_loop.py", rank=0)
    node.spawn("hostile_worker.py", rank=1)
    node.spawn("hostile_worker.py", "fail", rank=2)
    node.spawn("staller.py", "sleep", "10", "1000", rank=3)
    node.sidecar.wait_workers(3)
    # A worker not registered yet is None: wait for it rather than fail.
    wait_for(lambda: (node.sidecar.worker("3") or {}).get("stalled"), 15, what="rank 3 stalled")
    wait_for(
        lambda: (node.sidecar.worker("2") or {}).get("state") == "exited", 15, what="rank 2 exited"
    )
    yield node
    node.close()


@pytest.fixture(scope="module")
def crowd(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[Node]:
    node = Node(
        tmp_path_factory.mktemp("page-crowd"),
        "--token-file", str(token_file),
        "--heartbeat-timeout", "3",
        "--dump-timeout", "2",
        "--dump-dir", str(tmp_path_factory.mktemp("page-crowd-dumps")),
    ).start()  # fmt: skip
    node.sidecar.client.headers["Authorization"] = f"Bearer {TOKEN}"
    env = {"RANKSIDE_HEARTBEAT_INTERVAL": "0.5"}
    for rank in range(CROWD - 1):
        pause = "0.3" if rank == SLOW_RANK else "0.1"
        node.spawn("train_loop.py", "-1", pause, rank=rank, env=env)
    node.spawn("staller.py", "gil", "100", "600", rank=HUNG_RANK, env=env)
    node.sidecar.wait_workers(CROWD, timeout=60)
    yield node
    node.close()


def crowd_incident(crowd: Node) -> dict[str, Any]:
    """The stall incident whose verdict names the hung rank."""
    client = crowd.sidecar.client

    def named() -> dict[str, Any] | None:
        for incident in client.get("/api/v1/incidents").json()["incidents"]:
            if [c["rank"] for c in incident["culprits"]] == [HUNG_RANK]:
                return dict(incident)
        return None

    found: dict[str, Any] = wait_for(named, 40, interval=0.5, what="a verdict naming the hung rank")
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, node: Node, token_file: Path) -> Iterator[Node]:
    """A sidecar without workers whose page shows the job: ``node`` and a dead target."""
    dead = f"http://127.0.0.1:{free_port()}"
    job = Node(
        tmp_path_factory.mktemp("page-job"),
        "--token-file", str(token_file),
        "--target", node.sidecar.url,
        "--target", dead,
    ).start()  # fmt: skip
    yield job
    job.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_tool("chromium", "make system-deps")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (and session storage) that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


def open_with_token(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#token-form")).to_be_visible()
    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-form")).to_be_hidden()


def row(page: Page, rank: int) -> Locator:
    return page.locator("tr.worker").filter(
        has=page.locator("td.rank", has_text=re.compile(rf"^{rank}$"))
    )


def cell(page: Page, rank: int) -> Locator:
    return page.locator(f'#grid .cell[data-rank="{rank}"]')


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_page_and_its_files_need_no_token_but_the_data_does(node: Node) -> None:
    with httpx.Client(base_url=node.sidecar.url) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        for name in SCRIPTS:
            script = anonymous.get(f"/static/{name}")
            assert script.status_code == 200, name
            assert script.headers["content-type"].startswith("text/javascript")
            assert f'src="/static/{name}"' in page.text, name
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert sink not in script.text, (name, sink)
        for missing in ("/static/nope.js", "/static/..%2Fpage.py", "/static/index.html"):
            assert anonymous.get(missing).status_code == 404, missing
        assert anonymous.get("/api/v1/workers").status_code == 401


def test_token_is_asked_once_and_the_table_shows_real_workers(page: Page, node: Node) -> None:
    open_with_token(page, node.sidecar.url + "/")
    expect(page.locator("tr.worker")).to_have_count(4)
    # Broken ranks first: the stalled one and the one that died, then the rest.
    first_two = page.locator("tr.worker td.rank").all_text_contents()[:2]
    assert sorted(first_two) == ["2", "3"]
    expect(row(page, 3).locator(".badge")).to_have_text("stalled")
    expect(row(page, 2).locator(".badge")).to_have_text("failed")
    expect(row(page, 0).locator(".badge")).to_have_text("running")
    expect(page.locator("#banner")).to_contain_text("rank 3 stalled")
    # Steps per second and memory come from the sidecar once a few steps are in.
    expect(row(page, 0).locator("td").nth(4)).to_have_text(re.compile(r"^\d+(\.\d+)?$"))
    expect(row(page, 0).locator("td").nth(7)).to_have_text(re.compile(r"MiB$"))
    expect(page.locator("#dumps tbody tr").first).to_contain_text("dump_traceback")
    shot(page, "page-node")
    # The token is kept for the tab: a reload does not ask again.
    page.reload()
    expect(page.locator("tr.worker")).to_have_count(4)
    expect(page.locator("#token-form")).to_be_hidden()


def test_stacks_button_shows_a_real_stack(page: Page, node: Node) -> None:
    open_with_token(page, node.sidecar.url + "/")
    row(page, 0).get_by_role("button", name="Stacks").click()
    output = page.locator("tr.result-row pre.output")
    expect(output).to_contain_text("most recent call first")
    expect(output).to_contain_text("train_loop.py")
    expect(page.locator("tr.result-row .result-head")).to_contain_text("HTTP 200")
    shot(page, "page-stacks")


def test_worker_strings_with_html_render_as_text(page: Page, node: Node) -> None:
    open_with_token(page, node.sidecar.url + "/")
    hostile = row(page, 1)
    expect(hostile.locator("td.host")).to_contain_text(MARKUP)
    expect(hostile.locator("td.host")).to_contain_text(f"local 1 · {MARKUP}")
    # The handler name is an option's text, and calling it shows its body as text.
    more = hostile.locator("select.more")
    expect(more.locator("option", has_text=MARKUP)).to_have_count(1)
    more.select_option(MARKUP)
    expect(page.locator("tr.result-row pre.output")).to_have_text(MARKUP)
    # The exception message, in the failed row and in the events.
    expect(row(page, 2).locator(".detail")).to_have_text(f"RuntimeError: {MARKUP}")
    expect(page.locator("#events")).to_contain_text(f"failed: RuntimeError: {MARKUP}")
    shot(page, "page-injection")
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__rankside_pwned") is None


def test_incident_strings_from_workers_render_as_text(page: Page, node: Node) -> None:
    """The verdict quotes rank 2's exception; rank 1's stack names its frame in markup."""
    open_with_token(page, node.sidecar.url + "/")
    verdict = page.locator("#verdict")
    expect(verdict).to_contain_text("rank 2 on ")
    expect(verdict).to_contain_text(f"failed: RuntimeError: {MARKUP}")
    expect(page.locator("#culprits")).to_contain_text(MARKUP)
    expect(row(page, 2)).to_have_class(re.compile(r"\bculprit\b"))
    expect(row(page, 2).locator(".culprit-reason")).to_have_text(f"failed: RuntimeError: {MARKUP}")
    expect(cell(page, 2)).to_have_class(re.compile(r"\bculprit\b"))
    expect(cell(page, 2)).to_have_attribute("title", re.compile(re.escape(MARKUP)))
    hostile = page.locator("#groups details").filter(has_text=f"{MARKUP} at {MARKUP}:")
    expect(hostile).to_have_count(1)
    hostile.locator("summary").click()
    expect(hostile.locator(".frames li").first).to_have_text(
        re.compile(rf"^{re.escape(MARKUP)} at {re.escape(MARKUP)}:\d+$")
    )
    # The stacks of every rank at once, and rank 1's own is the same markup.
    page.locator("#all-actions button", has_text="Stacks").click()
    result = page.locator("#all-result")
    expect(result).to_contain_text("3 of 3 ranks answered 200")
    result.locator("summary", has_text="rank 1 ").click()
    expect(result.locator("pre.output")).to_contain_text(f'File "{MARKUP}"')
    shot(page, "page-incident-injection")
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__rankside_pwned") is None


def test_events_arrive_live(page: Page, node: Node) -> None:
    open_with_token(page, node.sidecar.url + "/")
    expect(page.locator("#live")).to_have_text("live")
    worker = node.spawn("train_loop.py", rank=5)
    # Only the stream brings events in on this page (it does not poll them).
    expect(page.locator("#events li").first).to_contain_text("rank 5", timeout=10_000)
    expect(row(page, 5)).to_have_count(1)
    worker.proc.kill()
    expect(row(page, 5).locator(".badge")).to_have_text("disconnected", timeout=10_000)


def test_job_view_merges_nodes_and_lists_the_unreachable(page: Page, job: Node) -> None:
    open_with_token(page, job.sidecar.url + "/")
    expect(page.locator("#scope")).to_have_text("job")
    expect(row(page, 0)).to_have_count(1)
    expect(page.locator("#nodes li")).to_contain_text("unreachable")
    expect(page.locator("#banner")).to_contain_text("unreachable")
    host = job.sidecar.url.split("://")[1]
    assert host not in row(page, 0).locator("td.host").text_content()
    # Actions go through this sidecar to the node that runs the rank.
    row(page, 0).get_by_role("button", name="Stacks").click()
    expect(page.locator("tr.result-row pre.output")).to_contain_text("train_loop.py")
    shot(page, "page-job")
    # The grid is the job's: a cell per rank of every node that answered.
    expect(cell(page, 0)).to_have_count(1)
    expect(page.locator("#grid .cell")).to_have_count(page.locator("tr.worker").count())
    # The fan-out is a node's route: the job view leaves it to each node's page.
    expect(page.locator("#all-actions button[data-all=dump_traceback]")).to_be_disabled()
    # Diagnose asks every node: the verdict lists the node that did not answer.
    page.locator("#all-actions button", has_text="Diagnose").click()
    expect(page.locator("#incident-meta")).to_contain_text("job")
    nodes = page.locator("#incident-nodes li")
    expect(nodes).to_have_count(3)
    expect(nodes.filter(has_text=job.sidecar.url.split("://")[1])).to_have_count(0)
    expect(page.locator("#incident-nodes li.bad")).to_have_count(1)
    shot(page, "page-job-incident")


def test_earlier_incidents_can_be_picked(page: Page, node: Node) -> None:
    open_with_token(page, node.sidecar.url + "/")
    page.locator("#all-actions button", has_text="Diagnose").click()
    # The manual incident just made is shown, and the stall is one click away.
    expect(page.locator("#incident-meta")).to_contain_text("manual")
    expect(page.locator("#all-result .verdict")).to_contain_text("rank 2")
    listed = page.locator("#incident-list li")
    expect(listed.first).to_contain_text("manual")
    listed.filter(has_text="stall").first.locator("button").click()
    expect(page.locator("#incident-meta")).to_contain_text("stall")
    expect(page.locator("#incident-list li.current")).to_contain_text("stall")


def test_grid_has_a_cell_per_rank_and_the_table_the_ranks_to_look_at(
    page: Page, crowd: Node
) -> None:
    incident = crowd_incident(crowd)
    open_with_token(page, crowd.sidecar.url + "/")
    expect(page.locator("#grid .cell")).to_have_count(CROWD)
    # The hung rank is the culprit, in the verdict, the grid and the table.
    expect(page.locator("#verdict")).to_have_text(incident["summary"])
    expect(page.locator("#verdict")).to_contain_text(f"rank {HUNG_RANK} ")
    expect(cell(page, HUNG_RANK)).to_have_class(re.compile(r"\bculprit\b"))
    expect(row(page, HUNG_RANK)).to_have_class(re.compile(r"\bculprit\b"))
    expect(page.locator("tr.worker td.rank").first).to_have_text(str(HUNG_RANK))
    # The slow rank stands out by colour, and its tooltip says by how much.
    expect(cell(page, SLOW_RANK)).to_have_class(re.compile(r"\bslow[23]\b"), timeout=10_000)
    expect(cell(page, SLOW_RANK)).to_have_attribute("title", re.compile(r"\u00d7 the median"))
    expect(cell(page, 10)).not_to_have_class(re.compile(r"\bslow"))
    # 64 rows would bury it: the table lists the culprit and the slowest first.
    shown = page.locator("tr.worker")
    expect(row(page, SLOW_RANK)).to_have_count(1)
    assert 2 <= shown.count() <= 16, shown.count()
    expect(page.locator("#table-note")).to_contain_text(f"of {CROWD} ranks")
    page.click("#show-all")
    expect(shown).to_have_count(CROWD)
    page.click("#show-all")
    assert shown.count() <= 16
    # Picking a rank in the grid shows it, and puts its row in the short table.
    cell(page, 20).click()
    expect(cell(page, 20)).to_have_class(re.compile(r"\bselected\b"))
    expect(page.locator("#rank-detail")).to_contain_text("rank 20 · running")
    expect(row(page, 20)).to_have_class(re.compile(r"\bselected\b"))
    # Every dump of the incident is linked, and one opens in the viewer.
    links = page.locator("#incident-dumps a")
    expect(links).to_have_count(len(incident["dumps"]))
    hrefs = {links.nth(i).get_attribute("href") for i in range(links.count())}
    assert hrefs == {f"/api/v1/dumps/{d}" for d in incident["dumps"]}, hrefs
    page.locator("#incident-dumps li", has_text="dump_traceback").locator("a").first.click()
    expect(page.locator("#dump-text")).to_contain_text("most recent call first")
    shot(page, "page-crowd")
    page.locator("main > .overview").screenshot(path=str(ARTIFACTS / "page-crowd-overview.png"))


# Per canvas row, the largest red channel across the row: the heatmap's heat.
ROW_HEAT = """([id, row]) => {
  const canvas = document.getElementById(id);
  const height = Number(canvas.dataset.rowHeight);
  const ctx = canvas.getContext("2d");
  const data = ctx.getImageData(4, row * height, canvas.width - 4, height).data;
  let max = 0;
  for (let i = 0; i < data.length; i += 4) max = Math.max(max, data[i]);
  return max;
}"""


def test_step_time_heatmap_shows_the_slow_rank(page: Page, crowd: Node) -> None:
    open_with_token(page, crowd.sidecar.url + "/")
    canvas = page.locator("#plot-step")
    expect(canvas).to_have_attribute("data-rows", str(CROWD))
    expect(canvas).to_have_attribute(
        "data-samples", re.compile(r"^([3-9]|\d{2,})$"), timeout=15_000
    )
    slow = page.evaluate(ROW_HEAT, ["plot-step", SLOW_RANK])
    hung = page.evaluate(ROW_HEAT, ["plot-step", HUNG_RANK])
    typical = [page.evaluate(ROW_HEAT, ["plot-step", r]) for r in (0, 10, 30)]
    assert slow > max(typical) + 80 and hung > max(typical) + 80, (slow, hung, typical)
    # Collective lag is plotted only where the sidecar measures it.
    stragglers = crowd.sidecar.client.get("/api/v1/stragglers")
    if stragglers.status_code == 404:
        expect(page.locator("#lag-figure")).to_be_hidden()
    else:
        expect(page.locator("#lag-figure")).to_be_visible()
    canvas.hover(position={"x": 200, "y": SLOW_RANK * 8 + 4})
    expect(canvas).to_have_attribute("title", re.compile(rf"^rank {SLOW_RANK}\b"))
    shot(page, "page-heatmap")


def test_stragglers_and_lag_when_the_sidecar_measures_them(
    page: Page, tmp_path: Path, token_file: Path
) -> None:
    """A real straggler: three ranks send the flight recorder's arrival times over the
    socket as workers do, rank 2 80 ms late at every collective; the page marks it and
    plots each rank's lag from GET /api/v1/stragglers."""
    node = Node(
        tmp_path, "--token-file", str(token_file), "--heartbeat-timeout", "300", "--no-pyspy"
    ).start()
    node.sidecar.client.headers["Authorization"] = f"Bearer {TOKEN}"
    peers = [RawPeer(node.socket_path) for _ in range(3)]
    try:
        base = 1_800_000_000 * 10**9
        for rank, peer in enumerate(peers):
            peer.hello(rank=rank)
            late = 80_000_000 if rank == 2 else rank * 1_000_000
            arrivals = {"0": [[seq, base + seq * 10**9 + late] for seq in range(1, 41)]}
            # No steps yet: a rank that is not stalled, whose lag the page reads alone.
            peer.send({"type": "heartbeat", "step": -1, "steps": 0, "progress_time": 0,
                       "arrivals": arrivals})  # fmt: skip
        answer = wait_for(
            lambda: (a := node.sidecar.client.get("/api/v1/stragglers").json())["stragglers"] and a,
            what="the sidecar naming rank 2 a straggler",
        )
        reason = answer["stragglers"][0]["reason"]
        open_with_token(page, node.sidecar.url + "/")
        expect(cell(page, 2)).to_have_class(re.compile(r"\bstraggler\b"))
        expect(cell(page, 2)).to_have_attribute("title", re.compile(re.escape(reason)))
        expect(row(page, 2).locator(".straggler-reason")).to_have_text(reason)
        expect(row(page, 2).locator("td.speed")).to_contain_text("lag 79 ms")
        expect(page.locator("#lag-figure")).to_be_visible()
        expect(page.locator("#plot-lag")).to_have_attribute(
            "data-samples", re.compile(r"^([2-9]|\d{2,})$"), timeout=15_000
        )
        slow = page.evaluate(ROW_HEAT, ["plot-lag", 2])
        typical = [page.evaluate(ROW_HEAT, ["plot-lag", r]) for r in (0, 1)]
        assert slow > max(typical) + 80, (slow, typical)
        shot(page, "page-stragglers")
    finally:
        for peer in peers:
            peer.sock.close()
        node.close()


FULL_HISTORY_DRAW = """() => {
  const ids = state.gridEntries.map((entry) => entry.id);
  const now = Date.now() / 1000;
  state.history = Array.from({ length: 150 }, (_, i) => ({
    t: now - 300 + 2 * i,
    step: new Map(ids.map((id, row) => [id, row % 7 ? 0.1 : 0.3])),
    lag: new Map(),
    stepMedian: 0.1,
  }));
  const started = performance.now();
  drawPlots();
  return performance.now() - started;
}"""


def test_the_overview_stays_readable_at_512_ranks(page: Page, crowd: Node) -> None:
    """The crowd's real listing, renumbered to 512 ranks: this machine cannot run 512 workers."""
    real = crowd.sidecar.client.get("/api/v1/workers").json()
    workers = []
    for copy in range(512 // CROWD):
        for worker in real["workers"]:
            rank = copy * CROWD + worker["rank"]
            workers.append({**worker, "key": str(rank), "rank": rank})
    listing = {**real, "workers": workers}
    page.route("**/api/v1/workers", lambda route: route.fulfill(json=listing))
    open_with_token(page, crowd.sidecar.url + "/")
    expect(page.locator("#grid .cell")).to_have_count(512)
    expect(page.locator("#table-note")).to_contain_text("of 512 ranks")
    assert page.locator("tr.worker").count() <= 16
    # The grid fits in a few lines, and one refresh's drawing takes little time.
    box = page.locator("#grid").bounding_box()
    assert box is not None and box["height"] < 300, box
    millis = page.evaluate(
        "() => { const t = performance.now(); renderWorkers(); return performance.now() - t; }"
    )
    expect(page.locator("#plot-step")).to_have_attribute("data-rows", "512")
    # Five minutes of samples: 150 columns of 512 ranks.
    plot_millis = page.evaluate(FULL_HISTORY_DRAW)
    print(f"512 ranks: one render {millis:.1f} ms, one heatmap of 150 samples {plot_millis:.1f} ms")
    page.locator("main > .overview").screenshot(path=str(ARTIFACTS / "page-512-overview.png"))
