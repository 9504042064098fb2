"""The flight recorder at incident time: the dump store's recorder files, the answers, the verdict.

The store is exercised on a real directory; the verdict and the validation of
``fr_recent`` answers are pure functions. The end-to-end path (real gloo ranks
under torchrun, the sidecar's incident, torchfrtrace on its directory) is in
``tests/test_collectives.py`` and below with a real worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_for
from node import Node
from system_tools import require_module

from sidecar.node.diagnosis import Enqueued, Evidence, RankView, Verdict, decide, positions
from sidecar.node.dumps import DumpStore
from sidecar.node.recorder import MalformedRecent, parse_recent
from sidecar.node.stacks import group_stacks
from sidecar.schema import WorkerState

# -- the dump store ---------------------------------------------------------------


def test_recorder_files_sit_in_the_incidents_directory_under_torchfrtraces_names(
    tmp_path: Path,
) -> None:
    store = DumpStore(str(tmp_path / "dumps"))
    store.save("stall1", "0", "dump_traceback", b"stack", "text/plain")
    dumps = []
    for rank in (0, 1):
        time.sleep(0.01)  # distinct times, for the order of the listing
        dumps.append(store.save_recorder("stall1", rank, b"pickle %d" % rank))
    assert [d.id for d in dumps] == ["stall1-fr_trace_rank_0", "stall1-fr_trace_rank_1"]
    assert {(d.incident, d.worker, d.what) for d in dumps} == {
        ("stall1", "0", "fr_trace"),
        ("stall1", "1", "fr_trace"),
    }
    directory = tmp_path / "dumps" / "stall1"
    assert store.recorder_dir("stall1") == directory
    assert sorted(p.name for p in directory.iterdir()) == ["fr_trace_rank_0", "fr_trace_rank_1"]
    assert directory.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o600}
    assert store.path_of("stall1-fr_trace_rank_1") == directory / "fr_trace_rank_1"
    listed = store.all()
    # Newest first, the recorder files among the others by time.
    assert [d.id for d in listed][:2] == ["stall1-fr_trace_rank_1", "stall1-fr_trace_rank_0"]
    assert len(listed) == 3 and listed[2].what == "dump_traceback"
    assert next(d for d in listed if d.id == "stall1-fr_trace_rank_0").content_type == (
        "application/octet-stream"
    )


def test_recorder_ids_cannot_leave_the_dump_directory(tmp_path: Path) -> None:
    store = DumpStore(str(tmp_path / "dumps"))
    (tmp_path / "fr_trace_rank_0").write_bytes(b"outside")
    bad_ids = ("..-fr_trace_rank_0", ".-fr_trace_rank_0", "x-fr_trace_rank_0/..", "fr_trace_rank_0")
    for bad in bad_ids:
        assert store.path_of(bad) is None, bad
    # An incident id of dots is written under "_", never beside the dump directory.
    dump = store.save_recorder("..", 0, b"inside")
    assert dump.id == "_-fr_trace_rank_0"
    assert (tmp_path / "fr_trace_rank_0").read_bytes() == b"outside"
    with pytest.raises(ValueError, match="global rank"):
        store.save_recorder("stall1", -1, b"")


def test_recorder_files_count_against_the_caps_oldest_first(tmp_path: Path) -> None:
    store = DumpStore(str(tmp_path / "dumps"), max_files=3)
    for rank in range(3):
        store.save_recorder("stall1", rank, b"x")
        time.sleep(0.01)
    store.save("stall2", "0", "dump_traceback", b"y", "text/plain")
    store.save_recorder("stall2", 0, b"z")
    ids = {d.id for d in store.all()}
    assert ids == {"stall1-fr_trace_rank_2", "stall2-fr_trace_rank_0"} | {
        d.id for d in store.all() if d.what == "dump_traceback"
    }
    assert len(ids) == 3
    # The incident whose files all went goes too, directory and all.
    store.max_files = 1
    store.enforce_caps()
    assert not (tmp_path / "dumps" / "stall1").exists()
    assert [d.id for d in store.all()] == ["stall2-fr_trace_rank_0"]


def test_an_incident_id_used_again_starts_with_an_empty_recorder_directory(
    tmp_path: Path,
) -> None:
    store = DumpStore(str(tmp_path / "dumps"))
    store.save_recorder("stall1", 7, b"from an earlier run")
    store.clear_recorder("stall1")
    store.clear_recorder("never-seen")
    assert list(store.recorder_dir("stall1").iterdir()) == []


# -- fr_recent answers --------------------------------------------------------------


def _answer(**group: Any) -> bytes:
    entry = {"seq": 5, "p2p": False, "op": "all_reduce", "site": "train.py:41", **group}
    return json.dumps({"groups": {"0": {"desc": "default_pg", "entries": [entry]}}}).encode()


def test_a_valid_answer_becomes_the_ranks_newest_ops() -> None:
    assert parse_recent(_answer()) == {"0": [Enqueued(5, "all_reduce", "train.py:41")]}
    assert parse_recent(b'{"groups": {}}') == {}


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"not json", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "'groups'"),
        (b'{"groups": []}', "'groups'"),
        (b'{"groups": {"0": []}}', "'entries'"),
        (b'{"groups": {"0": {"entries": [1]}}}', "object"),
        (_answer(seq=True), "'seq'"),
        (_answer(seq=-2), "'seq'"),
        (_answer(seq="5"), "'seq'"),
        (_answer(p2p="no"), "'p2p'"),
        (_answer(op=3), "'op'"),
        (_answer(site="x" * 301), "'site'"),
        (json.dumps({"groups": {str(i): {} for i in range(65)}}).encode(), "at most 64"),
    ],
)
def test_a_malformed_answer_is_refused_with_what_is_wrong(body: bytes, said: str) -> None:
    with pytest.raises(MalformedRecent) as refused:
        parse_recent(body)
    assert said in str(refused.value), refused.value


# -- the verdict --------------------------------------------------------------------


def _view(rank: int, enqueued: int, *ops: tuple[int, str, str]) -> RankView:
    position = {"desc": "default_pg", "ranks": [0, 1, 2], "enqueued": enqueued}
    recent = {"0": [Enqueued(seq, op, site) for seq, op, site in ops]}
    return RankView(rank, "node-a", {"0": position}, WorkerState.RUNNING, recent=recent)


def test_the_wait_says_the_op_and_where_the_waiting_ranks_called_it() -> None:
    verdict = decide(
        [
            _view(0, 37, (37, "all_reduce", "train.py:41"), (36, "all_reduce", "train.py:41")),
            _view(1, 37, (37, "all_reduce", "train.py:41")),
            _view(2, 36, (36, "all_reduce", "train.py:41")),
        ]
    )
    [wait] = verdict.waits
    assert (wait.op, wait.site, wait.missing) == ("all_reduce", "train.py:41", [2])
    assert verdict.summary == (
        "rank 2 on node-a has not entered all_reduce #37 of group 0 (default_pg) called at "
        "train.py:41, where ranks 0-1 wait; its last is #36"
    )


def test_without_the_recorders_answer_the_wait_says_what_it_knows() -> None:
    verdict = decide([_view(0, 37), _view(1, 36)])
    assert (verdict.waits[0].op, verdict.waits[0].site) == ("", "")
    assert "has not entered collective #37 of group 0 (default_pg), where" in verdict.summary


def test_a_rank_that_enqueued_another_op_at_the_same_sequence_number_is_named() -> None:
    # Every rank is at #12: positions alone name nobody.
    verdict = decide(
        [
            _view(0, 12, (12, "all_reduce", "train.py:41")),
            _view(1, 12, (12, "all_reduce", "train.py:41")),
            _view(2, 12, (12, "broadcast", "eval.py:9")),
        ]
    )
    assert [(c.rank, c.evidence) for c in verdict.culprits] == [(2, Evidence.COLLECTIVE)]
    assert verdict.culprits[0].reason == (
        "enqueued broadcast at the sequence number of all_reduce #12 of group 0 (default_pg) "
        "called at train.py:41, which ranks 0-1 enqueued"
    )


def test_two_ranks_that_disagree_name_nobody() -> None:
    verdict = decide(
        [_view(0, 12, (12, "all_reduce", "a.py:1")), _view(1, 12, (12, "broadcast", "b.py:2"))]
    )
    assert verdict.culprits == []


# -- the symbolizer -----------------------------------------------------------------

# A one-rank gloo group, a heartbeat's read, then the first dump with stacks.
_FIRST_DUMP = """
import json, os, sys, time
import torch, torch.distributed as dist
import worker_hooks
from worker_hooks import collectives
dist.init_process_group("gloo", rank=0, world_size=1)
for _ in range(collectives.WARMUP_AFTER_STEPS):
    dist.all_reduce(torch.ones(4))
    worker_hooks.step()
collectives.CollectiveProgress().read()
deadline = time.monotonic() + 120
while os.environ.get("RANKSIDE_FR_WARMUP") != "0" and collectives.warmup_seconds is None:
    assert time.monotonic() < deadline, "the warm-up never ended"
    time.sleep(0.05)
started = time.perf_counter()
collectives.recorder_dump(stack_traces=True)
first = time.perf_counter() - started
print(json.dumps({"first": first, "warmup": collectives.warmup_seconds,
                  "inductor": "torch._inductor" in sys.modules,
                  "stacks": collectives.recent_collectives(1)["stack_traces"]}))
"""


def _first_dump(tmp_path: Path, warmup: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANKSIDE_FR_WARMUP=warmup)
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_DUMP], env=env, capture_output=True, text=True,
        timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_symbolizer_is_warmed_once_torch_distributed_is_up(tmp_path: Path) -> None:
    require_module("torch")
    cold = _first_dump(tmp_path, "0")
    warm = _first_dump(tmp_path, "1")
    # What the first symbolization costs in torch 2.13: importing torch._inductor.
    assert cold["warmup"] is None and warm["warmup"] > 0, (cold, warm)
    assert warm["inductor"], warm
    # The warmed first dump costs a fraction of the cold one (seconds against milliseconds).
    assert warm["first"] < cold["first"] / 4, (cold, warm)
    assert warm["stacks"] and cold["stacks"], (cold, warm)


# -- a real worker ------------------------------------------------------------------


def test_a_worker_without_torch_distributed_answers_409(tmp_path: Path) -> None:
    node = Node(tmp_path).start()
    try:
        node.spawn("control_worker.py", rank=0)
        node.sidecar.wait_workers(1)
        for handler in ("fr_trace_dump", "fr_recent"):
            reply = node.sidecar.client.post(f"/api/v1/workers/0/handlers/{handler}")
            assert reply.status_code == 409, reply.text
            assert "torch.distributed is not initialised in this worker" in reply.text
        bad = node.sidecar.client.post("/api/v1/workers/0/handlers/fr_recent?entries=0")
        assert bad.status_code == 400 and "'entries'" in bad.text, bad.text
    finally:
        node.close()


def test_a_malformed_answer_is_left_out_of_the_verdict_with_an_event(tmp_path: Path) -> None:
    """A one-rank gloo job whose own ``fr_recent`` answers garbage, diagnosed on demand."""
    require_module("torch")
    dump_dir = tmp_path / "dumps"
    node = Node(tmp_path, "--dump-dir", str(dump_dir)).start()
    try:
        node.spawn("recorder_worker.py", rank=0, env={"WORLD_SIZE": "1", "BAD_RECENT": "1"})
        client = node.sidecar.client
        wait_for(
            lambda: any(w["collectives"] for w in client.get("/api/v1/workers").json()["workers"]),
            timeout=60,
            interval=0.2,
            what="the worker's collective progress",
        )
        incident = client.post("/api/v1/diagnose", timeout=90).json()
        assert incident["culprits"] == [], incident
        assert f"{incident['id']}-fr_trace_rank_0" in incident["dumps"], incident
        events = client.get("/api/v1/events").json()["events"]
        said = [e["message"] for e in events if e["kind"] == "handler_failed"]
        assert any("fr_recent with a malformed body" in m and "'groups'" in m for m in said), said
        # torchfrtrace reads the one rank's directory as it is.
        analyzer = subprocess.run(
            [sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace",
             str(dump_dir / incident["id"])],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip
        assert analyzer.returncode == 0, analyzer.stdout + analyzer.stderr
    finally:
        node.close()


def test_a_ranks_newest_ops_travel_between_sidecars() -> None:
    view = _view(2, 36, (36, "all_reduce", "train.py:41"))
    # Everything but the groups' rank lists, which travel once per group, not per rank.
    arrived = RankView.from_json(view.to_json())
    assert arrived == dataclasses.replace(view, collectives=positions(view.collectives))
    assert "ranks" in view.collectives["0"] and "ranks" not in arrived.collectives["0"]
    verdict = decide([_view(0, 37, (37, "all_reduce", "train.py:41")), view])
    assert Verdict.from_json(verdict.to_json()) == verdict
    sent = {**view.to_json(), "recent": {"0": [{"seq": "36", "op": "all_reduce"}]}}
    with pytest.raises(ValueError, match="rank 2: recent group '0': 'seq'"):
        RankView.from_json(sent)


def test_the_main_thread_is_found_beside_a_thread_cut_at_100_frames() -> None:
    """faulthandler cuts a deep stack, threading.py frames and all; the main thread is last."""
    deep = "".join(
        f'  File "/venv/site-packages/sympy/m{i}.py", line {i} in <module>\n' for i in range(100)
    )
    dump = (
        "Thread 0x00007f5907fff6c0 (most recent call first):\n"
        + deep
        + "  ...\n\n"
        + "Thread 0x00007f5943247b80 (most recent call first):\n"
        '  File "/venv/site-packages/torch/distributed/c10d.py", line 3252 in all_reduce\n'
        '  File "/job/train.py", line 67 in main\n'
        '  File "/job/train.py", line 75 in <module>\n'
    )
    [group] = group_stacks({0: dump})
    assert group["label"] == "all_reduce at train.py:67", group
