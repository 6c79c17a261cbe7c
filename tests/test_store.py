"""The durable store (astraea/store/), one suite run on both backends: SQLite in a temporary
state directory and a real PostgreSQL server started in a temporary directory
(tests/postgres_server.py). PostgreSQL cases skip only where no PostgreSQL binaries exist."""

from __future__ import annotations

import asyncio
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from postgres_server import PostgresServer, find_bin_dir

from astraea.store import (
    SCHEMA_VERSION,
    JobRecord,
    SchemaVersionError,
    SegmentProgress,
    StoredResponse,
    StoreError,
    TranscriptPiece,
    open_store,
)

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where a fresh, empty store lives: a state directory, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("pg_server").create_database(f"t_{uuid.uuid4().hex[:12]}")


def raw_query(target: str, sql: str) -> list:
    """Run SQL on a connection of its own, outside the store: what another process sees."""
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(Path(target) / "astraea.db", isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def job(job_id: str, **kw) -> JobRecord:
    return JobRecord(job_id=job_id, owner=kw.pop("owner", "key-1"),
                     category=kw.pop("category", "coding"),
                     arrival_unix_s=kw.pop("arrival_unix_s", 1_700_000_000.25), **kw)


# --- round trips -----------------------------------------------------------------------------
def test_job_round_trip_update_and_finish(target):
    with open_store(target) as store:
        assert store.get_job("nope") is None
        full = job("j1", state="api_wait", segment_index=3, context_tokens=1234,
                   generated_tokens=99, meta={"level": 2, "tool": "search", "ids": [1, 2]})
        store.put_job(full)
        store.put_job(job("j2", arrival_unix_s=1_700_000_001.0, owner=""))
        assert store.get_job("j1") == full
        store.update_job("j1", state="ready", context_tokens=1300, meta={"level": 1})
        got = store.get_job("j1")
        assert (got.state, got.context_tokens, got.meta) == ("ready", 1300, {"level": 1})
        assert (got.owner, got.segment_index, got.generated_tokens) == ("key-1", 3, 99)
        assert [j.job_id for j in store.load_unfinished()] == ["j1", "j2"]

        store.segment_progress("j1", 3, 7)
        store.put_prompt("j1", 3, "look it up")
        store.finish_job("j1", finished_unix_s=1_700_000_100.5, reason="EndJob",
                         generated_tokens=120)
        done = store.get_job("j1")  # finished jobs stay queryable
        assert (done.state, done.finished_unix_s, done.finish_reason, done.generated_tokens) \
            == ("finished", 1_700_000_100.5, "EndJob", 120)
        assert store.get_segments("j1") == [] and store.get_transcript("j1") == []
        assert [j.job_id for j in store.load_unfinished()] == ["j2"]

        store.put_job(job("old"))
        store.finish_job("old", finished_unix_s=1_000.0, reason="x", state="cancelled")
        store.prune_finished(finished_before_unix_s=1_700_000_000.0)
        assert store.get_job("old") is None and store.get_job("j1") is not None
        # put_job replaces the whole record (recovery may write a job again)
        store.put_job(job("j2", owner="key-2"))
        assert store.get_job("j2").owner == "key-2"


def test_segments_and_transcript_round_trip(target):
    with open_store(target) as store:
        store.put_job(job("j"))
        store.put_prompt("j", 0, "first prompt ✓")
        store.append_output("j", 0, [5, 6], at=0)
        store.append_output("j", 0, [7], at=2)
        store.append_output("j", 0, [], at=3)  # nothing to add
        store.segment_progress("j", 0, 3, "tool_call")
        store.put_prompt("j", 1, [101, 102, 2**31 - 1])
        store.put_prompt("j", 1, [101, 103])  # a prompt sent again replaces the first
        store.append_output("j", 1, [9], at=0)
        store.append_output("j", 1, [0], at=0)  # written again (a batch run twice): replaced
        store.segment_progress("j", 1, 1)
        assert store.get_transcript("j") == [
            TranscriptPiece(0, "prompt", text="first prompt ✓"),
            TranscriptPiece(0, "output", token_ids=(5, 6, 7)),
            TranscriptPiece(1, "prompt", token_ids=(101, 103)),
            TranscriptPiece(1, "output", token_ids=(0,)),
        ]
        assert store.get_segments("j") == [SegmentProgress(0, 3, "tool_call"),
                                           SegmentProgress(1, 1, None)]
        store.segment_progress("j", 1, 4, "stop")
        assert store.get_segments("j")[1] == SegmentProgress(1, 4, "stop")
        assert store.get_transcript("other") == []


def test_responses_and_blobs_round_trip(target):
    with open_store(target) as store:
        payload = {"body": {"id": "resp_1", "object": "response", "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "hi \"there\""}]}],
            "usage": {"input_tokens": 3, "output_tokens": 2}},
            "messages": [{"role": "user", "content": "hi"}], "session_key": "ab12"}
        r = StoredResponse("resp_1", owner="key-1", session_id="sess-9",
                           created_unix_s=1_700_000_000.0, payload=payload)
        store.put_response(r)
        store.put_response(StoredResponse("resp_2", "key-2", None, 1.0, {}))
        assert store.get_response("resp_1") == r
        assert store.get_response("resp_2").session_id is None
        assert store.get_response("resp_x") is None
        store.delete_response("resp_1")
        assert store.get_response("resp_1") is None

        state = bytes(range(256)) * 10
        store.put_blob("predictor/state", state)
        store.put_blob("empty", b"")
        assert store.get_blob("predictor/state") == state
        assert store.get_blob("empty") == b""
        store.put_blob("predictor/state", b"v2")
        assert store.get_blob("predictor/state") == b"v2"
        assert store.get_blob("missing") is None


# --- batching and durability -------------------------------------------------------------------
def test_writes_commit_when_someone_waits_and_reads_see_them(target):
    # An hour-long batch: nothing commits until someone waits (a flush or a read); the
    # store's own reads see every write queued before them, and another connection sees them
    # once the flush (or the read) returns.
    with open_store(target, batch_interval_s=3600, batch_max_ops=10**6) as store:
        store.put_job(job("j"))
        store.update_job("j", state="ready")
        time.sleep(0.2)
        assert raw_query(target, "SELECT COUNT(*) FROM astraea_jobs")[0][0] == 0
        assert store.get_job("j").state == "ready"
        store.update_job("j", state="running")
        commits = store.commits
        time.sleep(0.2)
        assert raw_query(target, "SELECT state FROM astraea_jobs")[0][0] == "ready"
        store.flush()
        assert raw_query(target, "SELECT state FROM astraea_jobs")[0][0] == "running"
        assert store.commits == commits + 1
        store.flush()  # nothing written since: no transaction at all
        assert store.commits == commits + 1


def test_writes_land_in_the_order_made(target):
    # Runs of the same statement are sent together (executemany): the last write still wins,
    # and a different statement in between keeps its place.
    with open_store(target) as store:
        store.put_job(job("j"))
        for i in range(1000):
            store.update_job("j", context_tokens=i)
            if i == 500:
                store.update_job("j", state="running", generated_tokens=7)
                store.append_output("j", 0, [i], at=i)
            store.append_output("j", 0, [i], at=i + (i >= 500))
        store.flush()
    with open_store(target) as store:
        got = store.get_job("j")
        assert (got.context_tokens, got.state, got.generated_tokens) == (999, "running", 7)
        expected = list(range(501)) + [500] + list(range(501, 1000))
        assert store.get_transcript("j") == [TranscriptPiece(0, "output",
                                                             token_ids=tuple(expected))]


def test_a_full_batch_commits_without_a_flush(target):
    with open_store(target, batch_interval_s=3600, batch_max_ops=5) as store:
        for i in range(5):
            store.put_job(job(f"j{i}"))
        deadline = time.monotonic() + 30
        while raw_query(target, "SELECT COUNT(*) FROM astraea_jobs")[0][0] < 5:
            assert time.monotonic() < deadline, "a full batch was never committed"
            time.sleep(0.05)


def test_the_interval_commits_without_a_flush(target):
    with open_store(target, batch_interval_s=0.05, batch_max_ops=10**6) as store:
        store.put_job(job("j"))
        deadline = time.monotonic() + 30
        while raw_query(target, "SELECT COUNT(*) FROM astraea_jobs")[0][0] < 1:
            assert time.monotonic() < deadline, "the batch interval never committed"
            time.sleep(0.05)


def test_flush_async_in_an_event_loop(target):
    async def main():
        with open_store(target, batch_interval_s=3600, batch_max_ops=10**6) as store:
            store.put_job(job("j"))
            await asyncio.wait_for(store.flush_async(), 30)
            return raw_query(target, "SELECT job_id FROM astraea_jobs")

    assert asyncio.run(main()) == [("j",)]


_CRASHING_WRITER = textwrap.dedent("""
    import sys, time
    from astraea.store import JobRecord, StoredResponse, open_store
    store = open_store(sys.argv[1], batch_interval_s=3600, batch_max_ops=10**6)
    for i in range(50):
        store.put_job(JobRecord(f"job-{i}", "key-1", "coding", 1000.0 + i))
        store.put_prompt(f"job-{i}", 0, f"prompt {i}")
        store.append_output(f"job-{i}", 0, list(range(i)), at=0)
        store.segment_progress(f"job-{i}", 0, i)
    store.finish_job("job-0", finished_unix_s=2000.0, reason="EndJob")
    store.put_response(StoredResponse("resp-1", "key-1", "s", 1.0, {"ok": True}))
    store.put_blob("predictor", b"state-1")
    store.flush()
    # Queued after the flush, never committed: the open batch a crash loses whole.
    for i in range(50, 60):
        store.put_job(JobRecord(f"job-{i}", "key-1", "coding", 1000.0 + i))
    store.update_job("job-1", state="running")
    print("flushed", flush=True)
    time.sleep(600)
""")


def test_a_sigkilled_writer_loses_only_its_open_batch(target):
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_WRITER, target], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "flushed", child.stderr.read()
        time.sleep(0.2)  # let it get the unflushed writes to the writer thread too
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with open_store(target) as store:  # also proves the SQLite file lock died with it
        unfinished = store.load_unfinished()
        assert [j.job_id for j in unfinished] == [f"job-{i}" for i in range(1, 50)]
        assert store.get_job("job-1").state == "arrived"  # the unflushed update is gone
        assert store.get_job("job-0").finish_reason == "EndJob"
        assert store.get_transcript("job-7") == [
            TranscriptPiece(0, "prompt", text="prompt 7"),
            TranscriptPiece(0, "output", token_ids=tuple(range(7)))]
        assert store.get_segments("job-49") == [SegmentProgress(0, 49)]
        assert store.get_response("resp-1").payload == {"ok": True}
        assert store.get_blob("predictor") == b"state-1"


def test_concurrent_writers_from_threads(target):
    threads_n, jobs_n = 8, 40
    errors: list[BaseException] = []
    with open_store(target, batch_interval_s=0.005, batch_max_ops=64) as store:
        def worker(t: int) -> None:
            try:
                for i in range(jobs_n):
                    jid = f"t{t}-j{i}"
                    store.put_job(job(jid))
                    for chunk in range(5):
                        store.append_output(jid, 0, [t, i, chunk], at=3 * chunk)
                        store.segment_progress(jid, 0, 3 * (chunk + 1))
                    store.update_job(jid, generated_tokens=15)
                    if i % 10 == 0:
                        store.flush()
                    assert store.get_job(jid).generated_tokens == 15
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        store.flush()
    with open_store(target) as store:
        jobs = store.load_unfinished()
        assert len(jobs) == threads_n * jobs_n
        assert all(j.generated_tokens == 15 for j in jobs)
        for t, i in ((0, 0), (3, 17), (7, 39)):
            out = store.get_transcript(f"t{t}-j{i}")
            assert out == [TranscriptPiece(0, "output", token_ids=tuple(
                x for chunk in range(5) for x in (t, i, chunk)))]
            assert store.get_segments(f"t{t}-j{i}") == [SegmentProgress(0, 15)]


def test_large_transcripts_are_stored_as_4_bytes_per_token(target):
    ids = [(i * 7919) % 150_000 for i in range(100_000)]
    with open_store(target) as store:
        store.put_job(job("big"))
        store.put_prompt("big", 0, ids)
        store.append_output("big", 0, ids[:60_000], at=0)
        store.append_output("big", 0, ids[60_000:], at=60_000)
        store.flush()
        pieces = store.get_transcript("big")
    assert pieces[0].token_ids == tuple(ids) and pieces[1].token_ids == tuple(ids)
    length = "octet_length" if target.startswith("postgresql") else "length"
    sizes = raw_query(target, f"SELECT role, SUM({length}(token_ids)) FROM astraea_transcript "
                              "GROUP BY role ORDER BY role")
    assert [(role, int(n)) for role, n in sizes] == [("output", 400_000), ("prompt", 400_000)]


# --- errors ------------------------------------------------------------------------------------
def test_schema_version_mismatch_is_refused(target):
    open_store(target).close()
    raw_query(target, "UPDATE astraea_schema SET version = 99")
    with pytest.raises(SchemaVersionError, match=f"schema version 99.*reads version "
                                                 f"{SCHEMA_VERSION}"):
        open_store(target)
    raw_query(target, f"UPDATE astraea_schema SET version = {SCHEMA_VERSION}")
    open_store(target).close()  # nothing was changed by the refused open


def test_bad_input_is_refused_before_anything_is_queued(target):
    with open_store(target) as store:
        store.put_job(job("j"))
        with pytest.raises(ValueError, match="cannot set owner"):
            store.update_job("j", owner="someone-else")
        with pytest.raises(ValueError, match="at least one field"):
            store.update_job("j")
        with pytest.raises(ValueError, match="int32"):
            store.append_output("j", 0, [2**31], at=0)
        with pytest.raises(ValueError, match="at must be a non-negative integer"):
            store.append_output("j", 0, [1], at=-1)
        with pytest.raises(ValueError, match="sequence of integers"):
            store.put_prompt("j", 0, [1, "two"])
        with pytest.raises(ValueError, match="meta is not JSON"):
            store.put_job(job("k", meta={"x": math.nan}))
        with pytest.raises(ValueError, match="job_id is empty"):
            store.put_job(job(""))
        with pytest.raises(ValueError, match="NUL"):
            store.put_prompt("j", 0, "a\x00b")
        with pytest.raises(ValueError, match="segment must be a non-negative"):
            store.segment_progress("j", -1, 0)
        with pytest.raises(TypeError, match="takes a JobRecord"):
            store.put_job({"job_id": "x"})
        store.flush()  # the store still works: nothing bad reached the database
        assert store.get_job("j").owner == "key-1" and store.get_job("k") is None


@pytest.mark.parametrize("bad,message", [
    ("", "no store given"),
    ("mysql://u@h/db", "unsupported store scheme 'mysql'"),
    ("redis://:secret@h:1", "unsupported store scheme 'redis'"),
    ("sqlite://", "no file named"),
])
def test_bad_targets_are_refused(bad, message):
    with pytest.raises(StoreError, match=message) as err:
        open_store(bad)
    assert "secret" not in str(err.value)


def test_a_file_is_not_a_state_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        open_store(tmp_path / "f")
    (tmp_path / "junk.db").write_text("not a database, just text" * 100)
    with pytest.raises(StoreError, match="cannot open the SQLite database"):
        open_store(f"sqlite://{tmp_path / 'junk.db'}")


def test_sqlite_url_names_a_file(tmp_path):
    with open_store(f"sqlite://{tmp_path / 'sub' / 'my.db'}") as store:
        store.put_blob("b", b"1")
    assert (tmp_path / "sub" / "my.db").is_file()


def test_unreachable_postgres_is_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL") as err:
        open_store(f"postgresql://astraea:hunter2@127.0.0.1:{port}/x")
    assert "hunter2" not in str(err.value) and "astraea:***@" in str(err.value)


def test_two_stores_on_one_state_directory_are_refused(tmp_path):
    with open_store(tmp_path):
        with pytest.raises(StoreError, match="another process has this state file open"):
            open_store(tmp_path)
    open_store(tmp_path).close()  # released on close


def test_every_write_can_be_committed_twice(target, monkeypatch):
    # After a lost connection the writer runs its round again, though it may have committed
    # before the acknowledgement was lost: every write must land the same done twice.
    from astraea.store.writer import BatchWriter

    original = BatchWriter._round

    def twice(self, ops):
        original(self, [op for op in ops if op[0] == 0])  # the writes alone, committed
        return original(self, ops)

    monkeypatch.setattr(BatchWriter, "_round", twice)
    with open_store(target) as store:
        store.put_job(job("j", meta={"a": 1}))
        store.put_prompt("j", 0, [1, 2])
        store.append_output("j", 0, [5, 6], at=0)
        store.append_output("j", 0, [7], at=2)
        store.update_job("j", state="api_wait", segment_index=1, generated_tokens=3)
        store.segment_progress("j", 0, 3, "tool_call")
        store.put_job(job("k"))
        store.finish_job("k", finished_unix_s=5.0, reason="EndJob", generated_tokens=4)
        store.put_response(StoredResponse("r", "key-1", None, 1.0, {"x": 1}))
        store.put_response(StoredResponse("gone", "key-1", None, 1.0, {}))
        store.delete_response("gone")
        store.put_blob("b", b"1")
        store.flush()
        assert store.get_transcript("j") == [TranscriptPiece(0, "prompt", token_ids=(1, 2)),
                                             TranscriptPiece(0, "output",
                                                             token_ids=(5, 6, 7))]
        got = store.get_job("j")
        assert (got.state, got.segment_index, got.generated_tokens) == ("api_wait", 1, 3)
        assert store.get_segments("j") == [SegmentProgress(0, 3, "tool_call")]
        k = store.get_job("k")
        assert (k.state, k.finish_reason, k.generated_tokens) == ("finished", "EndJob", 4)
        assert store.get_response("gone") is None and store.get_blob("b") == b"1"
        assert [j.job_id for j in store.load_unfinished()] == ["j"]


def test_a_lost_connection_reconnects_and_commits_the_cut_batch(pg_server):
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    store = open_store(url, batch_interval_s=3600, batch_max_ops=10**6)
    try:
        store.put_job(job("j"))
        store.flush()
        store.put_job(job("k"))
        store.append_output("k", 0, [1, 2], at=0)
        # Cut the store's connection while its batch is open (not yet committed).
        pg_server.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          f"WHERE datname = '{url.rsplit('/', 1)[1]}'")
        store.append_output("k", 0, [3], at=2)
        store.flush(timeout=30)  # reconnected, and the whole batch committed
        assert store.outage is None
        assert raw_query(url, "SELECT job_id FROM astraea_jobs ORDER BY job_id") == \
            [("j",), ("k",)]
        assert store.get_transcript("k") == [TranscriptPiece(0, "output", token_ids=(1, 2, 3))]
    finally:
        store.close()


@pytest.fixture
def own_pg_server():
    """A server of the test's own, to stop and start again."""
    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    server = PostgresServer.start()
    yield server
    server.stop()


def test_a_restarted_server_loses_no_write_and_reads_fail_fast_meanwhile(own_pg_server):
    pg = own_pg_server
    url = pg.create_database("restart")
    store = open_store(url, batch_interval_s=3600, batch_max_ops=10**6)
    try:
        store.put_job(job("before"))
        store.flush()
        pg.pause()
        store.put_job(job("during"))
        store.append_output("during", 0, [7, 8], at=0)
        flushed = threading.Thread(target=store.flush, kwargs={"timeout": 120})
        flushed.start()  # finds the connection gone: the store reconnects, the flush waits
        deadline = time.monotonic() + 30
        while store.outage is None:
            assert time.monotonic() < deadline, "the lost connection was never noticed"
            time.sleep(0.02)
        assert "the database is unreachable" in store.outage and "reconnecting" in store.outage
        started = time.monotonic()
        with pytest.raises(StoreError, match="the database is unreachable"):
            store.get_job("before")  # a read does not wait for the database
        assert time.monotonic() - started < 5
        store.update_job("during", state="running")  # writes still queue
        assert flushed.is_alive()  # the flush waits: nothing it covers is committed yet
        pg.resume()
        flushed.join(120)
        assert not flushed.is_alive()
        store.flush(timeout=60)
        assert store.outage is None
        assert store.get_job("during").state == "running"
        assert store.get_transcript("during") == [TranscriptPiece(0, "output",
                                                                  token_ids=(7, 8))]
        assert raw_query(url, "SELECT COUNT(*) FROM astraea_jobs")[0][0] == 2
    finally:
        store.close()


def test_a_database_that_stays_away_fails_the_store_after_the_bound(own_pg_server):
    pg = own_pg_server
    url = pg.create_database("gone")
    store = open_store(url, batch_interval_s=3600, batch_max_ops=10**6,
                       reconnect_timeout_s=1.0)
    try:
        store.put_job(job("j"))
        store.flush()
        pg.pause()
        store.put_job(job("k"))
        with pytest.raises(StoreError, match="the database stayed unreachable for"):
            store.flush(timeout=60)
        with pytest.raises(StoreError, match="stayed unreachable"):
            store.get_job("j")  # and it stays failed: no silent half-working store
    finally:
        store.close()
        pg.resume()  # for the fixture's stop
