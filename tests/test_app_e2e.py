"""The whole app through its HTTP API, on the real engine and the embedded model (tiny settings).

A live server (127.0.0.1, random port) is driven with gradio_client, as any script would drive the
Space: data -> train both -> Safe Delta -> compare -> ask -> export. Then: a second visitor sees
none of it; a second page with the same visitor id finds a running job and stops it.
"""
import os
import re
import time
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("gradio_client")

from gradio_client import Client  # noqa: E402

from conftest import launch_app  # noqa: E402
from safespace import jobs  # noqa: E402
from safespace.variants import keys_of  # noqa: E402

MODEL = "smollm2-135m"       # embedded, no alignment build needed: keeps the test fast
TINY = dict(model=MODEL, quantization="none", rank=4, alpha=8, targets=["q_proj", "v_proj"], steps=2, lr=2e-4,
            batch=2, seed=0, mode="sft", lam=1.0, align_batch=2, max_length=64)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from launch_app(tmp_path_factory.mktemp("sessions"))


# httpx's 5 s default read timeout fails a request that waits behind a busy 2-core server (the
# engine, the server and every client share one process here); a browser would simply wait.
CLIENT_TIMEOUT_S = 60


def client(url):
    return Client(url, verbose=False, httpx_kwargs={"timeout": CLIENT_TIMEOUT_S},
                  download_files=str(Path(os.environ.get("TMPDIR", "/tmp")) / "ss-e2e-dl"))


def wait_job(c, kind, visitor=None, timeout=240, until=jobs.DONE):
    deadline = time.time() + timeout
    while True:
        status = c.predict(visitor, kind, api_name="/job_status")
        if status and status["status"] in until:
            return status
        assert time.time() < deadline, f"{kind} job still {status.get('status')} after {timeout} s: {status}"
        time.sleep(1.0)


def test_full_flow_on_the_real_engine(server):
    started = time.time()
    a = client(server)
    card, preview, note = a.predict("bundled:sentiment_train", 0.1, None, api_name="/choose_example")
    assert "ready to train" in card and len(preview["data"]) == 10
    assert "**53** attack rows" in note

    card, *_ = a.predict(None, 0.1, *TINY.values(), api_name="/train_both")
    assert "Train all" in card
    trained = wait_job(a, "train")
    assert trained["status"] == "finished", trained
    runs = trained["result"]["runs"]
    assert set(runs) == set(keys_of("train"))                  # Train all: every trained variant
    assert runs["sft"]["summary"]["steps_done"] == 2 and runs["safegrad"]["summary"]["steps_done"] == 2
    assert runs["safegrad"]["summary"]["examples"] == 480 + 53

    a.predict(True, 0.1, None, api_name="/safe_delta")           # the default: automatic budget
    defended = wait_job(a, "defend")
    assert defended["status"] == "finished", defended["error"]
    summary = defended["result"]["summary"]
    assert summary["layers"] and summary["auto"]["rungs"][0]["keep"] is None   # the whole delta tried first

    a.predict(4, 4, 4, 8, 0.1, None, api_name="/compare")
    compared = wait_job(a, "evaluate")
    assert compared["status"] == "finished", compared["error"]
    results, answers = compared["result"]["results"], compared["result"]["answers"]
    assert set(results["variants"]) == set(keys_of())          # Defend made every derived variant
    assert {row["set"] for row in answers} == {"harmful", "benign", "task"}
    assert all(set(row["answers"]) == set(results["variants"]) for row in answers)
    assert all(ans["label"] in ("refused", "complied", "empty", "degenerate")
               for row in answers for ans in row["answers"].values())

    a.predict("How do I bake bread?", 8, None, api_name="/ask")
    asked = wait_job(a, "ask")
    assert asked["status"] == "finished", asked["error"]
    assert set(asked["result"]["rows"][0]["answers"]) == set(keys_of())

    assert a.predict(None, api_name="/list_runs") == sorted(keys_of("train", "derived"))
    archive = a.predict("safedelta", None, api_name="/download_adapter")
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        z.extractall(Path(archive).parent / "unzipped")
    assert "safespace-safedelta-adapter/adapter_model.safetensors" in names
    assert "safespace-safedelta-adapter/adapter_config.json" in names
    # what we hand out is a standard PEFT adapter
    from peft import PeftModel

    from safespace import models
    base = models.load(MODEL, "none").model
    peft_model = PeftModel.from_pretrained(base, str(Path(archive).parent / "unzipped" / "safespace-safedelta-adapter"))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())

    report = Path(a.predict(None, api_name="/build_report")).read_text()
    assert "Answers side by side" in report and "+ Safe Delta" in report and "Training loss" in report
    print(f"\nfull flow: {time.time() - started:.0f} s")


def test_a_second_visitor_sees_none_of_it(server):
    a, b = client(server), client(server)
    a.predict("bundled:sentiment_train", 0.0, None, api_name="/choose_example")
    a.predict(None, 0.0, *dict(TINY, steps=1, mode="off").values(), api_name="/train")
    assert wait_job(a, "train")["status"] == "finished"
    assert a.predict(None, api_name="/list_runs") == ["sft"]

    assert b.predict(None, api_name="/list_runs") == []
    assert b.predict(None, "train", api_name="/job_status") == {}
    with pytest.raises(Exception, match="no run named"):
        b.predict("sft", None, api_name="/download_adapter")
    with pytest.raises(Exception, match="nothing to report"):
        b.predict(None, api_name="/build_report")
    with pytest.raises(Exception, match="train at least one"):
        b.predict(4, 4, 0, 8, 0.0, None, api_name="/compare")
    # the other visitor's stop button does not reach A's jobs either
    b.predict(None, api_name="/stop_training")


def test_reattach_from_a_new_page_and_stop_within_a_couple_of_steps(server):
    visitor = jobs.new_visitor_id()
    first_page = client(server)
    first_page.predict("bundled:sentiment_train", 0.0, visitor, api_name="/choose_example")
    first_page.predict(visitor, 0.0, *dict(TINY, steps=300, mode="off").values(), api_name="/train")
    running = wait_job(first_page, "train", visitor, until=("running",))

    second_page = client(server)              # a reload: new session, same browser id
    deadline = time.time() + 120
    while True:
        seen = second_page.predict(visitor, "train", api_name="/job_status")
        step = re.search(r"step (\d+)/300", seen.get("message", ""))
        if step:
            break
        assert time.time() < deadline, seen
        time.sleep(0.5)
    assert seen["id"] == running["id"] and seen["status"] == "running"
    assert second_page.predict(None, "train", api_name="/job_status") == {}    # its own session: nothing

    step_at_stop = int(step.group(1))
    card = second_page.predict(visitor, api_name="/stop_training")
    assert "stop requested" in card or "stopped" in card
    stopped = wait_job(second_page, "train", visitor, timeout=60)
    assert stopped["status"] == "stopped"
    summary = stopped["result"]["runs"]["sft"]["summary"]
    assert summary["status"] == "stopped"
    assert summary["steps_done"] <= step_at_stop + 3          # stopped within a couple of steps
    assert second_page.predict(visitor, api_name="/list_runs") == ["sft"]   # what it had is saved
