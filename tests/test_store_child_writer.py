"""SQLite with `writer="process"` (astraea/store/child_writer.py): the statements run in a child
process that the caller's event loop drives. What its one user (the control plane) relies on:
the same batching and read-your-writes as the thread writer, commits on the loop's timer, no
deadlock on rounds larger than a pipe holds, a dead child failing the store with a clear error
instead of hanging it, and a killed owner taking its child (and the state file's lock) with it
while what it flushed stays."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from processes import alive

from astraea.store import JobRecord, StoreError, TranscriptPiece, open_store

ROOT = Path(__file__).resolve().parents[1]


def _job(job_id: str) -> JobRecord:
    return JobRecord(job_id=job_id, owner="k", category="qa", arrival_unix_s=1000.0)


def _outside(state: Path, sql: str) -> list:
    """What another connection (another process) sees."""
    conn = sqlite3.connect(state / "astraea.db", isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _child_pids() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def test_writes_batch_commit_on_the_loops_timer_and_reads_see_them(tmp_path):
    async def main():
        store = open_store(tmp_path, batch_interval_s=0.05, writer="process")
        try:
            store.put_job(_job("j"))
            store.update_job("j", state="running")
            assert store.get_job("j").state == "running"  # a read sees what was queued
            store.update_job("j", context_tokens=7)
            # No flush: the loop's timer sends the round.
            deadline = time.monotonic() + 30
            while _outside(tmp_path, "SELECT context_tokens FROM astraea_jobs") != [(7,)]:
                assert time.monotonic() < deadline, "the interval never committed"
                await asyncio.sleep(0.02)
            store.put_prompt("j", 0, [1, 2, 3])
            store.append_output("j", 0, [4, 5], at=0)
            await asyncio.wait_for(store.flush_async(), 30)
            assert _outside(tmp_path, "SELECT COUNT(*) FROM astraea_transcript") == [(2,)]
            assert store.commits >= 3 and store.statements == 5
        finally:
            await store.close_async()

    asyncio.run(main())


def test_a_flush_whose_waiter_was_cancelled_leaves_the_store_working(tmp_path):
    """A flush awaited with a timeout that expires (asyncio.wait_for cancels it): the child's
    answer arrives for a cancelled future later; the store must go on."""
    async def main():
        store = open_store(tmp_path, writer="process")
        try:
            store.put_job(_job("j"))
            waiter = asyncio.ensure_future(store.flush_async())
            await asyncio.sleep(0)  # the round is sent
            waiter.cancel()
            store.update_job("j", context_tokens=9)
            await asyncio.wait_for(store.flush_async(), 30)
            assert _outside(tmp_path, "SELECT context_tokens FROM astraea_jobs") == [(9,)]
            assert waiter.cancelled()
        finally:
            await store.close_async()

    asyncio.run(main())


def test_rounds_larger_than_a_pipe_holds_do_not_deadlock(tmp_path):
    async def main():
        # 256 chunks of 4,000 tokens: a 4 MB round each way through 64 KB pipes, and a read
        # of it back while the loop also sends.
        store = open_store(tmp_path, batch_interval_s=3600, batch_max_ops=10**6,
                           writer="process")
        try:
            store.put_job(_job("big"))
            for k in range(256):
                store.append_output("big", 0, list(range(k * 4000, (k + 1) * 4000)),
                                    at=k * 4000)
            await asyncio.wait_for(store.flush_async(), 60)
            pieces = store.get_transcript("big")
            assert pieces == [TranscriptPiece(0, "output", token_ids=tuple(range(256 * 4000)))]
        finally:
            await store.close_async()

    asyncio.run(main())


def test_without_a_loop_rounds_go_at_each_flush_or_read(tmp_path):
    with open_store(tmp_path, writer="process") as store:
        store.put_job(_job("j"))
        store.flush()
        assert _outside(tmp_path, "SELECT job_id FROM astraea_jobs") == [("j",)]
        store.update_job("j", state="api_wait")
        assert store.get_job("j").state == "api_wait"


def test_a_call_from_another_thread_is_refused(tmp_path):
    with open_store(tmp_path, writer="process") as store:
        errors: list[BaseException] = []

        def other():
            try:
                store.put_job(_job("x"))
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
        assert "another thread" in str(errors[0])
        store.put_job(_job("j"))  # the owner's calls go on
        assert store.get_job("j") is not None


def _wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 30
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived SIGKILL"
        time.sleep(0.01)


def test_a_dead_writer_process_fails_the_store_with_a_clear_error(tmp_path):
    async def main():
        before = set(_child_pids())
        store = open_store(tmp_path, writer="process")
        (child,) = set(_child_pids()) - before
        store.put_job(_job("j"))
        await asyncio.wait_for(store.flush_async(), 30)
        os.kill(child, signal.SIGKILL)
        _wait_dead(child)  # its pipes closed: the next round meets a broken pipe on the way out
        store.put_job(_job("k"))
        with pytest.raises(StoreError, match="writer process exited"):
            await asyncio.wait_for(store.flush_async(), 30)
        with pytest.raises(StoreError, match="writer process exited"):
            store.put_job(_job("m"))
        store.close()  # releases the state file
        with open_store(tmp_path, writer="process") as again:  # what was flushed is there
            assert [j.job_id for j in again.load_unfinished()] == ["j"]

    asyncio.run(main())


_OWNER = textwrap.dedent("""
    import asyncio, sys, time
    from astraea.store import JobRecord, open_store

    async def main():
        store = open_store(sys.argv[1], batch_interval_s=3600, batch_max_ops=10**6,
                           writer="process")
        for i in range(20):
            store.put_job(JobRecord(f"job-{i}", "k", "qa", 1000.0 + i))
        await store.flush_async()
        store.put_job(JobRecord("unflushed", "k", "qa", 2000.0))
        print("flushed", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
""")


def test_a_killed_owner_takes_its_writer_process_and_lock_with_it(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "flushed", owner.stderr.read()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    # The child sees its stdin close and exits; until then it holds the lock with its owner.
    deadline = time.monotonic() + 30
    while True:
        try:
            store = open_store(tmp_path, writer="process")
            break
        except StoreError:
            assert time.monotonic() < deadline, "the writer process kept the state file"
            time.sleep(0.05)
    with store:
        assert [j.job_id for j in store.load_unfinished()] == [f"job-{i}" for i in range(20)]


def test_a_writer_process_whose_owner_died_mid_round_exits_quietly(tmp_path):
    # The owner sent a round and was killed before reading the answer: the child's answer
    # meets a pipe nobody reads. It exits cleanly, and prints no traceback into the log the
    # owner shared with it (the restarted control plane's, which is read as JSON lines).
    from astraea.store.child_writer import _HEADER

    child = subprocess.Popen(
        [sys.executable, "-m", "astraea.store.child_writer", str(tmp_path / "astraea.db")],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the dead owner's end of the answer pipe
    body = pickle.dumps([])  # an empty round: answered ("ok", None)
    child.stdin.write(_HEADER.pack(len(body)) + body)
    child.stdin.close()
    assert child.wait(30) == 0
    assert child.stderr.read().decode() == ""


def test_an_unknown_writer_is_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown store writer"):
        open_store(tmp_path, writer="fork")


_INTERRUPTED_OWNER = textwrap.dedent("""
    import asyncio, signal, sys
    from astraea.store import JobRecord, open_store

    # Started in the background, a process may inherit SIGINT ignored (and pass that on to
    # its children): this one takes Ctrl-C as a terminal's foreground program does.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def main():
        store = open_store(sys.argv[1], batch_interval_s=3600, batch_max_ops=10**6,
                           writer="process")
        try:
            store.put_job(JobRecord("early", "k", "qa", 1000.0))
            await store.flush_async()
            store.put_job(JobRecord("late", "k", "qa", 1001.0))  # committed by close only
            print("ready", flush=True)
            await asyncio.sleep(600)
        finally:
            store.close()

    asyncio.run(main())
""")


def test_a_ctrl_c_to_the_owners_group_lets_it_commit_its_last_round(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_OWNER, str(tmp_path)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert owner.stdout.readline().strip() == "ready", owner.stderr.read()
        os.killpg(owner.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        owner.wait(30)
    finally:
        if owner.poll() is None:
            owner.kill()
    with open_store(tmp_path, writer="process") as store:
        assert [j.job_id for j in store.load_unfinished()] == ["early", "late"]


def test_one_store_used_from_one_loop_after_another(tmp_path):
    store = open_store(tmp_path, batch_interval_s=0.01, writer="process")
    try:
        async def write(job_id):
            store.put_job(_job(job_id))
            await asyncio.wait_for(store.flush_async(), 30)

        asyncio.run(write("a"))
        asyncio.run(write("b"))  # the first loop is closed: the store follows the second
        store.put_job(_job("c"))  # and none: sent with the next flush
        store.flush()
        assert [j.job_id for j in store.load_unfinished()] == ["a", "b", "c"]
    finally:
        store.close()
