"""The canonical chain (docs/API.md, Progress and the canonical chain) against a reference.

``reference_progress`` (support/oracle.py) is written from docs/API.md's words alone and is built
differently from ``chain.walk``: instead of one pass over sorted files it grows
the chain greedily, each step choosing, among every file that starts right
after the chain's tip and links to it by hash, the one registered last. (In
the documented walk, once the chain has moved past ``end + 1`` no later file
can link at that start, so the first linking file in walk order is exactly the
most recently registered linking file with that start.)

First the reference's hand-worked examples, through the reference and through
the API. Then two properties:
- ``chain.walk`` over the files in walk order equals the reference;
- registering random files through the real API, in random batches and
  orders (with identical retries), keeps the stored progress equal to the
  reference over every file registered so far, after every batch.

test_chain_order.py registers longer chains out of order and checks the stored
chain's files (job_chain) as well.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.store import chain

from support.oracle import expected_progress, reference_progress
from support.service import MAX_ID, block_hash, file_entry, new_job


def walk_order(files: list[dict]) -> list[dict]:
    """Step 1 of the documented walk: by start_block, the most recently registered first."""
    order = sorted(range(len(files)), key=lambda i: (files[i]["start_block"], -i))
    return [files[i] for i in order]


def as_chain_file(f: dict) -> chain.ChainFile:
    return chain.ChainFile(
        f["start_block"], f["end_block"], f["size_bytes"], f.get("block_hash"), f.get("prev_hash")
    )


def chain_as_progress(c: chain.Chain | None) -> dict:
    if c is None:
        return {"start_block": None, "current_block": None, "files_count": 0, "total_size_bytes": 0}
    return {
        "start_block": c.start_block,
        "current_block": c.current_block,
        "files_count": c.files_count,
        "total_size_bytes": c.total_size_bytes,
    }


# Hand-worked cases: (files in registration order, the table's progress).
DOCUMENTED_EXAMPLES = {
    "no_files": ([], expected_progress(None, None, 0, 0)),
    # A gap: 0-9, 20-29 -> only 0-9; filling 10-19 extends over 20-29.
    "gap": ([file_entry("a", 0, 9), file_entry("c", 20, 29)], expected_progress(0, 9, 1, 1)),
    "gap_filled": (
        [file_entry("a", 0, 9), file_entry("c", 20, 29), file_entry("b", 10, 19)],
        expected_progress(0, 29, 3, 3),
    ),
    # A fork: the later registration at the same start wins.
    "fork": (
        [file_entry("a", 0, 9), file_entry("b", 10, 19, 5), file_entry("b2", 10, 14, 7)],
        expected_progress(0, 14, 2, 8),
    ),
    # A mismatch: the newer fork does not link, the older one does.
    "mismatch": (
        [
            file_entry("a", 0, 9, 1, block_hash(1)),
            file_entry("b", 10, 19, 1, block_hash(2), block_hash(1)),
            file_entry("b2", 10, 12, 1, prev_hash=block_hash(9)),
        ],
        expected_progress(0, 19, 2, 2),
    ),
    # The first file is the most recent at the lowest start, whatever it links to.
    "lowest_start": (
        [file_entry("c", 5, 9), file_entry("a", 0, 4), file_entry("a2", 0, 2)],
        expected_progress(0, 2, 1, 1),
    ),
}


def test_the_documented_examples_through_the_reference_and_the_api(client):
    """The reference agrees with the hand-worked cases before it judges anything, and so
    does the service, each case registered file by file into a table of its own."""
    job_id = new_job(client)
    for table, (files, expected) in DOCUMENTED_EXAMPLES.items():
        assert reference_progress(files) == expected, table
        for file in files:
            response = client.post(f"/jobs/{job_id}/tables/{table}/files", json=file)
            assert response.status_code == 201, response.get_json()
    tables = client.get(f"/jobs/{job_id}/progress").get_json()["tables"]
    assert tables == {t: expected for t, (files, expected) in DOCUMENTED_EXAMPLES.items() if files}


# ---- Strategies ------------------------------------------------------------------

HASHES = st.one_of(st.none(), st.integers(1, 4).map(block_hash))
SIZES = st.one_of(st.integers(0, 1000), st.sampled_from([0, 2**62, 2**63 - 1]))


@st.composite
def random_file(draw) -> dict:
    start = draw(st.one_of(st.integers(0, 25), st.sampled_from([MAX_ID - 3, MAX_ID])))
    length = draw(st.integers(1, 6))
    return {
        "start_block": start,
        "end_block": min(start + length - 1, MAX_ID),
        "size_bytes": draw(SIZES),
        "block_hash": draw(HASHES),
        "prev_hash": draw(HASHES),
    }


@st.composite
def linked_run(draw) -> list[dict]:
    """A contiguous, hash-linked run of files (so long chains are common)."""
    start = draw(st.integers(0, 6))
    files = []
    prev = draw(HASHES)
    for _ in range(draw(st.integers(1, 6))):
        end = start + draw(st.integers(0, 4))
        block_hash = draw(HASHES)
        files.append(
            {
                "start_block": start,
                "end_block": end,
                "size_bytes": draw(SIZES),
                "block_hash": block_hash,
                "prev_hash": prev if draw(st.booleans()) else draw(HASHES),
            }
        )
        prev, start = block_hash, end + 1
    return files


@st.composite
def file_sets(draw, max_noise: int = 8) -> list[dict]:
    """Files in registration order: linked runs plus noise, shuffled, some duplicated starts."""
    files = [f for run in draw(st.lists(linked_run(), max_size=3)) for f in run]
    files += draw(st.lists(random_file(), max_size=max_noise))
    files = draw(st.permutations(files))
    # Re-registering a start block (a fork or a reorg) with other contents.
    for _ in range(draw(st.integers(0, 3))):
        if not files:
            break
        twin = dict(draw(st.sampled_from(files)))
        twin["end_block"] = min(twin["start_block"] + draw(st.integers(0, 5)), MAX_ID)
        twin["block_hash"] = draw(HASHES)
        twin["prev_hash"] = draw(HASHES)
        files.insert(draw(st.integers(0, len(files))), twin)
    return files


# ---- chain.walk against the reference ---------------------------------------------


@settings(max_examples=400, deadline=None)
@given(file_sets())
def test_walk_matches_reference(files):
    got = chain.walk(as_chain_file(f) for f in walk_order(files))
    assert chain_as_progress(got) == reference_progress(files)


# ---- Incremental maintenance through the API --------------------------------------


@st.composite
def registration_plans(draw):
    """Files (registration order) cut into batches, with identical retries mixed in."""
    files = draw(file_sets(max_noise=10))
    for i, f in enumerate(files):
        f["file_name"] = f"blocks_{i:04d}.parquet"
    batches, i = [], 0
    while i < len(files):
        n = draw(st.integers(1, 4))
        batches.append(files[i : i + n])
        i += n
    plan = []
    for k, batch in enumerate(batches):
        retry = []
        if k and draw(st.booleans()):
            # A worker retrying an earlier file (identical fields) alongside new ones.
            retry = [draw(st.sampled_from([f for b in batches[:k] for f in b]))]
        plan.append((batch, retry))
    return files, plan


def _wire(f: dict) -> dict:
    body = {k: f[k] for k in ("file_name", "start_block", "end_block", "size_bytes")}
    for key in ("block_hash", "prev_hash"):
        if f[key] is not None:
            body[key] = f[key]
    return body


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=registration_plans(), as_array=st.booleans())
def test_stored_progress_equals_recomputation(client, plan, as_array):
    files, batches = plan
    job_id = new_job(client)
    registered: list[dict] = []
    for batch, retry in batches:
        payload = [_wire(f) for f in retry + batch]
        if len(payload) == 1 and not as_array:
            payload = payload[0]
        response = client.post(f"/jobs/{job_id}/tables/blocks/files", json=payload)
        assert response.status_code == 201, response.get_json()
        body = response.get_json()
        assert (body["registered"], body["unchanged"]) == (len(batch), len(retry))
        registered += batch
        expected = reference_progress(registered)
        assert body["progress"] == expected
        progress = client.get(f"/jobs/{job_id}/progress").get_json()
        assert progress["tables"] == {"blocks": expected}
    # A pure retry of everything changes nothing and answers 200.
    if files:
        response = client.post(
            f"/jobs/{job_id}/tables/blocks/files", json=[_wire(f) for f in files[:1000]]
        )
        assert response.status_code == 200
        assert response.get_json()["progress"] == reference_progress(files)
    else:
        assert client.get(f"/jobs/{job_id}/progress").get_json()["tables"] == {}
