"""Evidence maps, the model's view and questions about a region through a real model server process
on loopback (the demo model), spoken to by the package's client: what the server makes equals what
the pipeline makes in this process, a region or window it cannot use is refused with one sentence,
Stop ends a map, and results travel deflated to remote clients."""

from __future__ import annotations

import json
import re
import threading
import zlib

import nibabel as nib
import numpy as np
import pytest

import med3dvlm
from med3dvlm.cancel import Cancelled, CancelToken
from med3dvlm.cli import main
from med3dvlm.client import tasks
from med3dvlm.client.remote import ServerWarning
from med3dvlm.client.transport import Server, ServerError, exchange, run
from med3dvlm.resources import sample_path
from med3dvlm.wire import VOLUME_HEADER, inflate_steps, parse_header, run_steps, volume_digest, volume_from_bytes
from server_process import start_server

CT, MR = str(sample_path("ct_phantom.nii.gz")), str(sample_path("mr_phantom_t2.nii.gz"))
REGION = ((-100.0, -80.0, -250.0), (50.0, 60.0, -150.0))  # RAS mm, inside the CT phantom's body
REGION_MR = ((-60.0, -60.0, -40.0), (60.0, 60.0, 40.0))  # inside the MR phantom
OTHER_WINDOW = (60.0, 300.0)  # not the demo model's trained CT window


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    process = start_server(tmp_path_factory.mktemp("explain-server"), "--device", "cpu", "--threads", "1",
                           standin=False)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(served):
    return med3dvlm.connect(served.url)


@pytest.fixture(scope="module")
def local():
    return med3dvlm.load("demo", device="cpu")


class RemoteServer(Server):
    """The loopback server addressed as a remote one would be (results come deflated)."""

    @property
    def is_local(self) -> bool:
        return False


def assert_same_evidence(remote, here) -> None:
    assert (remote.answer, remote.question, remote.method) == (here.answer, here.question, here.method)
    assert remote.preprocessing == here.preprocessing and remote.map.shape == here.map.shape
    np.testing.assert_array_equal(remote.map.affine, here.map.affine)
    np.testing.assert_array_equal(remote.map.array != 0, here.map.array != 0)  # the same voxels seen
    # The server runs torch on one thread, this process on several: sums in another order.
    peak = np.abs(here.map.array).max()
    np.testing.assert_allclose(remote.map.array, here.map.array, rtol=1e-3, atol=1e-3 * peak)


@pytest.mark.parametrize("question, kwargs", [
    (None, {"answer": "Findings: no focal lesion."}),  # a report
    ("Is there a cyst?", {"answer": "No.", "history": [("Which organ is enlarged?", "The liver.")],
                          "region": REGION, "method": "integrated"}),  # a chat answer about a region
    ("Which organ has a cyst?", {"choices": ["liver", "spleen", "left kidney", "right kidney"]}),  # its own answer
])
def test_evidence_from_the_server_equals_evidence_made_here(client, local, question, kwargs):
    remote = client.explain(CT, question, samples=2, **kwargs)
    assert_same_evidence(remote, local.explain(CT, question, samples=2, **kwargs))
    made = client.last_provenance
    assert made["task"] == "explain" and made["weights_blake2b"] == local.weights
    assert made["preprocessing"]["volumes"][0]["region"] == remote.preprocessing["region"]


def test_score_evidence_from_the_server_equals_the_detectors(client, local):
    remote = client.explain_detection(MR, "cyst in the liver", samples=2)
    here = local.explain_detection(MR, "cyst in the liver", samples=2)
    assert list(remote) == list(here) == ["T2"]
    assert_same_evidence(remote["T2"], here["T2"])
    assert client.last_provenance["task"] == "explain-score"
    with pytest.raises(ServerError, match="no label 'polyp in the colon'") as refused:
        client.explain_detection(MR, "polyp in the colon")
    assert refused.value.status == 422


def test_the_model_view_from_the_server_is_the_one_made_here(client, local):
    with pytest.warns(ServerWarning, match="trained with the fixed CT window"):
        remote = client.model_view(CT, REGION, OTHER_WINDOW)
    with pytest.warns(UserWarning):
        here = local.model_view(CT, REGION, OTHER_WINDOW)
    np.testing.assert_array_equal(remote.volume.array, here.volume.array)
    np.testing.assert_array_equal(remote.volume.affine, here.volume.affine)
    assert (remote.box_ras, remote.box_voxels, remote.preprocessing) == (here.box_ras, here.box_voxels,
                                                                         here.preprocessing)


def test_region_and_window_reach_the_answers_and_their_provenance(client, local):
    question = "Which organ has a cyst?"
    with pytest.warns(ServerWarning, match="L60/W300 shows it intensities it was not trained on"):
        answer = client.ask(CT, question, region=REGION, window=OTHER_WINDOW)
    with pytest.warns(UserWarning):
        assert answer == local.ask(CT, question, region=REGION, window=OTHER_WINDOW)
    shown = client.last_provenance["preprocessing"]["volumes"][0]
    assert shown["region"]["ras"] == [list(corner) for corner in REGION] and shown["window"] == list(OTHER_WINDOW)
    assert client.report(CT, region=REGION, max_new_tokens=16) == local.report(CT, region=REGION, max_new_tokens=16)
    client.ask(CT, question)
    assert client.last_provenance["preprocessing"]["volumes"][0]["region"] is None  # the whole volume again
    scores = client.detect(MR, region=REGION_MR)
    assert dict(scores) == pytest.approx(dict(local.detect(MR, region=REGION_MR)))
    assert client.last_provenance["preprocessing"]["volumes"][0]["region"]["ras"] == [list(c) for c in REGION_MR]



@pytest.mark.parametrize("path, body, sentence", [
    ("/ask", {"question": "Cyst?", "region": [[0, 0, -200], [0, 30, -150]]},
     r"^The region is empty: its two corners have the same R-L coordinate, so it has no size there; draw a box"),
    ("/report", {"region": [[900, 900, 900], [990, 990, 990]]}, r"^The region \(R 900 to 990, .*\) lies outside volume"),
    ("/ask", {"question": "Cyst?", "region": [[0, 0, -200], [2, 2, -196]]},
     r"^The region is too small for the model's 32 x 128 x 128 input, .*; draw a larger box\.$"),
    ("/report", {"window": [40, 0]}, r"^A window is \(centre, width\) .* with a positive width; got"),
    ("/explain", {"region": [[1, 2, 3]]}, r"^The request was refused \(region\.1: Field required\)\.$"),
    ("/detect", {"region": [[0, 0, 0], [1, 1]]}, r"^The request was refused \(region\..*\)\.$"),
])
def test_a_region_or_window_the_model_cannot_use_is_refused_with_one_sentence(client, path, body, sentence):
    digest = client.encode(MR if path == "/detect" else CT)
    body = {**body, **({"volumes": [digest]} if path == "/detect" else {"volume": digest})}
    response = run(exchange(client.server, "POST", path, headers=tasks.JSON, body=[json.dumps(body).encode()]))
    assert response.status == 422
    assert re.match(sentence, response.detail()) and response.detail().count("\n") == 0


def test_stop_ends_an_evidence_map_without_one(client):
    statuses: list[dict] = []

    def on_event(event):  # Stop, from the client, once the map is under way
        if event.get("stage") == "explaining" and not statuses:
            run(tasks.cancel_job(client.server, job_id[0]))
        statuses.append(event)

    job_id = []
    final = run(tasks.explain(client.server, client.encode(CT),
                              lambda e: job_id.append(e["id"]) if e["event"] == "queued" else on_event(e),
                              answer="No.", samples=64))
    assert final["stopped"] and "evidence" not in final
    assert max(e.get("done", 0) for e in statuses) < 64  # it did not run to the end
    cancel = CancelToken()
    threading.Timer(1.0, cancel.cancel).start()
    with pytest.raises(Cancelled, match="stopped before it was complete"):
        client.explain(CT, answer="No.", samples=64, cancel=cancel)


def test_results_travel_deflated_to_a_remote_client_and_are_checked(client):
    here = run(tasks.view(client.server, client.encode(CT), lambda event: None))["view"]["volume"]
    digest = volume_digest(here)  # the server names its results by the same content digest as uploads
    response = run(exchange(client.server, "GET", f"/results/{digest}", headers=[("Accept-Encoding", "deflate")]))
    assert response.headers["content-encoding"] == "deflate"
    assert len(response.body) < here.array.nbytes  # deflated: the air around the body compresses
    header = parse_header(response.headers[VOLUME_HEADER.lower()])
    inflated = volume_from_bytes(header, run_steps(inflate_steps(response.body, here.array.nbytes)))
    np.testing.assert_array_equal(inflated.array, here.array)
    far = RemoteServer(client.server.url)
    np.testing.assert_array_equal(run(tasks.result_volume(far, digest)).array, here.array)
    with pytest.raises(ValueError, match="not valid deflate data"):
        run_steps(inflate_steps(b"not deflated" + response.body, here.array.nbytes))
    with pytest.raises(ValueError, match="more or fewer than the 2097152 bytes"):
        run_steps(inflate_steps(response.body[:-1000], here.array.nbytes))
    with pytest.raises(ServerError, match="no longer has result 0{32}.*ask for it again") as gone:
        run(tasks.result_volume(client.server, "0" * 32))
    assert gone.value.status == 404


def test_cli_explains_through_a_server(served, local, tmp_path, capsys):
    out = tmp_path / "map.nii.gz"
    region = [str(c) for corner in REGION for c in corner]
    assert main(["explain", CT, "Is there a cyst?", "--answer", "No.", "--server", served.url, "--region", *region,
                 "--samples", "1", "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["provenance"]["task"] == "explain" and printed["provenance"]["model"] == "demo"
    assert printed["provenance"]["preprocessing"]["volumes"][0]["region"]["ras"] == [list(c) for c in REGION]
    here = local.explain(CT, "Is there a cyst?", "No.", region=REGION, samples=1).map
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, here.affine)
    peak = np.abs(here.array).max()
    np.testing.assert_allclose(np.asarray(written.dataobj), here.array, rtol=1e-3, atol=1e-3 * peak)
