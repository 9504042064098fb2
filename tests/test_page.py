"""The web page in a real browser: Debian's chromium, driven by playwright.

One sidecar with a token and real workers (one of them reporting HTML in every
string it can), one sidecar with --target for the job view, and one browser,
all shared by the module. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, wait_for, write_token_file
from node import Node
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from system_tools import require_tool
from workers.hostile_worker import MARKUP

TOKEN = "page-test-token"
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
        "--stall-after", "1",
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
        script = anonymous.get("/static/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
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
