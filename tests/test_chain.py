"""The canonical chain (CONTRACT.md §3, GET /jobs/{id}/progress) against a reference.

``reference_progress`` is written from the contract's words alone and is built
differently from ``chain.walk``: instead of one pass over sorted files it grows
the chain greedily, each step choosing, among every file that starts right
after the chain's tip and links to it by hash, the one registered last. (In
the contract's walk, once the chain has moved past ``end + 1`` no later file
can link at that start, so the first linking file in walk order is exactly the
most recently registered linking file with that start.)

Three properties:
- ``chain.walk`` over the files in walk order equals the reference;
- resuming the walk from a stored summary, as ``chain.refresh_table`` does when
  every new file lies past the tip, equals the reference over all files;
- registering random files through the real API, in random batches and
  orders (with identical retries), keeps the stored progress equal to the
  reference over every file registered so far, after every batch.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chain

MAX_BLOCK = 2**63 - 1


def hash_of(n: int) -> str:
    return "0x" + f"{n:064x}"


# ---- The reference -----------------------------------------------------------


def _links(tip: dict, file: dict) -> bool:
    if file["start_block"] != tip["end_block"] + 1:
        return False
    if tip.get("block_hash") is None or file.get("prev_hash") is None:
        return True
    return file["prev_hash"].lower() == tip["block_hash"].lower()


def reference_progress(files: list[dict]) -> dict:
    """One table's progress entry; ``files`` is every file in registration order."""
    if not files:
        return {"start_block": None, "current_block": None, "files_count": 0, "total_size_bytes": 0}
    lowest = min(f["start_block"] for f in files)
    # Registration order: a higher index is registered later, so it wins a tie.
    first = max(i for i, f in enumerate(files) if f["start_block"] == lowest)
    picked = [files[first]]
    while True:
        tip = picked[-1]
        linking = [i for i, f in enumerate(files) if _links(tip, f)]
        if not linking:
            break
        picked.append(files[max(linking)])
    return {
        "start_block": picked[0]["start_block"],
        "current_block": picked[-1]["end_block"],
        "files_count": len(picked),
        "total_size_bytes": sum(f["size_bytes"] for f in picked),
    }


def walk_order(files: list[dict]) -> list[dict]:
    """The contract's step 1: by start_block, the most recently registered first."""
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


def test_reference_on_the_contract_examples():
    """The reference itself, on hand-worked cases, before it judges anything."""
    h = hash_of

    def f(s, e, size=1, bh=None, ph=None):
        return {
            "start_block": s,
            "end_block": e,
            "size_bytes": size,
            "block_hash": bh,
            "prev_hash": ph,
        }

    assert reference_progress([])["files_count"] == 0
    # Gap: 0-9, 20-29 -> only 0-9; filling 10-19 extends over 20-29.
    assert reference_progress([f(0, 9), f(20, 29)])["current_block"] == 9
    assert reference_progress([f(0, 9), f(20, 29), f(10, 19)])["current_block"] == 29
    # Fork: the later registration at the same start wins.
    assert reference_progress([f(0, 9), f(10, 19, 5), f(10, 14, 7)]) == {
        "start_block": 0,
        "current_block": 14,
        "files_count": 2,
        "total_size_bytes": 8,
    }
    # Mismatch: the newer fork does not link, the older one does.
    files = [f(0, 9, bh=h(1)), f(10, 19, bh=h(2), ph=h(1)), f(10, 12, ph=h(9))]
    assert reference_progress(files)["current_block"] == 19
    # The first file is the most recent at the lowest start, whatever it links to.
    assert reference_progress([f(5, 9), f(0, 4), f(0, 2)])["current_block"] == 2


# ---- Strategies ------------------------------------------------------------------

HASHES = st.one_of(st.none(), st.integers(1, 4).map(hash_of))
SIZES = st.one_of(st.integers(0, 1000), st.sampled_from([0, 2**62, 2**63 - 1]))


@st.composite
def random_file(draw) -> dict:
    start = draw(st.one_of(st.integers(0, 25), st.sampled_from([MAX_BLOCK - 3, MAX_BLOCK])))
    length = draw(st.integers(1, 6))
    return {
        "start_block": start,
        "end_block": min(start + length - 1, MAX_BLOCK),
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
        twin["end_block"] = min(twin["start_block"] + draw(st.integers(0, 5)), MAX_BLOCK)
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


@settings(max_examples=300, deadline=None)
@given(file_sets(), file_sets(), st.data())
def test_resumed_walk_matches_reference(old, more, data):
    """refresh_table's shortcut: when every new file starts past the tip, resume there."""
    stored = chain.walk(as_chain_file(f) for f in walk_order(old))
    if stored is None:
        return
    new = [f for f in more if f["start_block"] > stored.current_block]
    everything = old + new
    past_tip = [f for f in walk_order(everything) if f["start_block"] > stored.current_block]
    resumed = chain.walk((as_chain_file(f) for f in past_tip), stored)
    assert chain_as_progress(resumed) == reference_progress(everything)
    # And the full walk agrees too.
    full = chain.walk(as_chain_file(f) for f in walk_order(everything))
    assert full == resumed


# ---- Incremental maintenance through the API --------------------------------------


def new_job(client) -> int:
    response = client.post("/jobs", json={"node_id": "worker-01", "descriptor": {}})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


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
