"""The web app's handlers, called directly (no server): checks, limits, escaping, polling, isolation.

Training, Safe Delta and generation are replaced by fakes here; tests/test_app_e2e.py runs the real
engine through a live server.
"""
import ast
import json
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from conftest import fake_run
from safespace import jobqueue, jobs
from safespace.train import Event
from safespace.ui import common, compare, data, defend, export, train
from safespace import ui
from safespace.variants import keys_of

REPO = Path(__file__).resolve().parents[1]
A, B = "visitor-aaaa", "visitor-bbbb"
REQ = SimpleNamespace(session_hash="session-zzzz")
SKIP = gr.skip()
FORM = dict(model="smollm2-135m", quantization="none", rank=4, alpha=8, targets=["q_proj", "v_proj"], steps=3,
            lr=2e-4, batch=2, seed=0, mode="off", lam=1.0, align_batch=2)


def wait_idle(m, visitor, timeout=10.0):
    deadline = time.time() + timeout
    while m.has_active(visitor):
        assert time.time() < deadline, "job did not finish"
        time.sleep(0.02)


def fake_train_job(ctx, plan, source, ratio, seed):
    """Stands in for jobs.train_job: emits real-looking step events, honours stop, writes runs."""
    for index, (variant, settings) in enumerate(plan):
        for step in range(1, settings.steps + 1):
            if ctx.should_stop():
                return {"runs": {}}
            metrics = {"step": step, "loss": 2.0 / step}
            if variant == "safegrad":
                metrics.update(align_loss=0.5, cos=-0.2, conflict=True)
            jobs.TrainReporter(ctx.channel, variant, index, len(plan))(Event("step", step, settings.steps, metrics))
            time.sleep(0.01)
        fake_run(ctx.workspace.run_path(variant), metrics=[{"step": 1, "loss": 1.0}])
    return {"runs": {v: {} for v, _ in plan}}


# ------------------------------------------------------------------------------ visitors

def test_visitor_id_prefers_the_browser_id_then_the_session():
    assert common.visitor_id(A, REQ) == A
    assert common.visitor_id(None, REQ) == "session-zzzz"
    assert common.visitor_id("../../etc/passwd", REQ) == "session-zzzz"     # tampered value ignored
    assert common.visitor_id(None, SimpleNamespace(session_hash="ab/c..d-e_f9")) == "abcd-e_f9"
    with pytest.raises(gr.Error):
        common.visitor_id(None, SimpleNamespace(session_hash=None))


def test_on_load_mints_an_id_and_restores_the_page(manager):
    out = ui.on_load(None, REQ)
    minted = out[0]
    assert jobs.valid_visitor(minted) and minted != "session-zzzz"
    timer = out[2]
    assert timer.active is False                       # nothing running: no polling
    assert ui.on_load(minted, REQ)[0] == minted        # a known id is kept
    n = len(train.FORM_KEYS)
    assert out[-n - 1].selected == 1                   # a new visitor starts at the data step
    form = out[-n:]
    assert form[0] == SKIP and form[2:] == [SKIP] * (n - 2)   # and keeps the form's defaults...
    assert [v for _, v in form[1].choices][:2] == ["smollm2-135m-safe", "smollm2-135m"]   # ...with fresh model states


def test_reload_reattaches_to_a_running_job(manager, monkeypatch):
    gate = __import__("threading").Event()

    def slow_train(ctx, plan, source, ratio, seed):
        jobs.TrainReporter(ctx.channel, "sft")(Event("step", 1, 3, {"step": 1, "loss": 1.5, "eta": 20}))
        gate.wait(10)
        return {"runs": {}}

    monkeypatch.setattr(jobs, "train_job", slow_train)
    train.train(A, 0.0, *FORM.values(), request=REQ)
    deadline = time.time() + 5
    while manager.latest(A, "train").status != "running" or not manager.latest(A, "train").events:
        assert time.time() < deadline
        time.sleep(0.02)
    # a new page (fresh view state) with the same browser id
    out = ui.on_load(A, SimpleNamespace(session_hash="another-page"))
    timer, card = out[2], out[3]
    assert timer.active is True
    assert 'data-status="running"' in card and "step 1/3" in card
    n = len(train.FORM_KEYS)
    walkthrough, form = out[-n - 1], out[-n:]
    assert walkthrough.selected == 2                    # lands on the Train step
    assert form[1].value == FORM["model"]               # with the settings it was started with
    assert form[2:-1] == list(FORM.values())[1:] and form[-1] == train.DEFAULTS.max_length
    # ...while another visitor's page sees nothing of it
    other = ui.on_load(B, SimpleNamespace(session_hash="third-page"))
    assert other[2].active is False and "running" not in other[3]
    gate.set()
    wait_idle(manager, A)


# ------------------------------------------------------------------------------ data step

def test_bundled_example_is_checked_previewed_and_selected(manager):
    card, rows, note = data.choose_example("demo_upload.jsonl", 0.0, A, REQ)
    assert "ready to train" in card and "format: prompt-response" in card
    assert len(rows) == 10 and rows[0][1] == "A Walk in the Park on a Sunny Day"
    ws = manager.workspace(A)
    assert data.source_of(data.selection(ws), ws).endswith("demo_upload.jsonl")
    assert "36 training rows" in note                   # 40 rows minus the 10 % validation split


def test_broken_example_lists_problems_and_keeps_the_previous_choice(manager):
    card, rows, _ = data.choose_example("broken.jsonl", 0.0, A, REQ)
    assert "cannot be used" in card and "line 2" in card and rows == []
    assert "Training keeps using: Review sentiment" in card
    ws = manager.workspace(A)
    assert data.source_of(data.selection(ws), ws) == data.SENTIMENT


def test_unknown_example_is_refused(manager):
    with pytest.raises(gr.Error):
        data.choose_example("../../secrets.jsonl", 0.0, A, REQ)


def test_upload_is_copied_into_the_visitors_workspace(manager, tmp_path):
    src = tmp_path / "My Data (v2).jsonl"
    src.write_text("".join(json.dumps({"prompt": f"<b>q{i}</b>", "response": f"a{i}"}) + "\n" for i in range(20)))
    card, rows, note = data.upload(str(src), 0.25, A, REQ)
    assert "ready to train" in card and rows[0] == ["<b>q0</b>", "a0"]
    ws = manager.workspace(A)
    source = data.source_of(data.selection(ws), ws)
    assert Path(source).parent == ws.uploads and Path(source).name == "My_Data_v2.jsonl"
    assert "k = round(0.25 × 18 / 0.75) = **6**" in note      # 20 rows minus 2 held out
    # visitor B still has the default and cannot point at A's upload
    ws_b = manager.workspace(B)
    assert data.source_of(data.selection(ws_b), ws_b) == data.SENTIMENT
    assert data.source_of({"kind": "upload", "name": "../visitor-aaaa/uploads/My_Data_v2.jsonl"}, ws_b) is None


def test_upload_limits_and_types_are_enforced(manager, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * 5_000_001)
    card, rows, _ = data.upload(str(big), 0.0, A, REQ)
    assert "limit here is 5 MB" in card and rows == []
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    card, _, _ = data.upload(str(odd), 0.0, A, REQ)
    assert "unsupported file type" in card
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nhi,there\n")
    card, _, _ = data.upload(str(bad), 0.0, A, REQ)
    assert "cannot be used" in card
    assert list(manager.workspace(A).uploads.iterdir()) == []    # refused files are not kept


def test_a_failed_upload_keeps_the_last_good_upload_selected(manager, tmp_path):
    good = tmp_path / "reviews.csv"
    good.write_text("prompt,response\n" + "".join(f"review {i},positive\n" for i in range(20)))
    assert "ready to train" in data.upload(str(good), 0.0, A, REQ)[0]
    ws = manager.workspace(A)
    kept = data.source_of(data.selection(ws), ws)
    broken = tmp_path / "broken.csv"
    broken.write_text("question,answer\nhi,there\n")
    same_name = tmp_path / "sub" / "reviews.csv"             # a broken file under the good one's name
    same_name.parent.mkdir()
    same_name.write_text("question,answer\nhi,there\n")
    for bad in (broken, same_name):
        card, rows, _ = data.upload(str(bad), 0.0, A, REQ)
        assert "cannot be used" in card and rows == []
        assert "Training keeps using: your file reviews.csv" in card
        assert data.source_of(data.selection(ws), ws) == kept      # still selected, the file still there
        assert Path(kept).read_text() == good.read_text()
    _, card, rows = data.restore(ws)                              # and still there when the visitor returns
    assert "reviews.csv: ready to train" in card and rows[0] == ["review 0", "positive"]
    assert sorted(p.name for p in ws.uploads.iterdir()) == ["reviews.csv"]


def test_the_data_card_explains_the_held_out_rows(manager):
    card, _, note = data.choose_example("demo_upload.jsonl", 0.0, A, REQ)
    assert "rows: 40" in card and "40 rows: 36 for training, 4 held out to measure your task" in card
    assert "your 36 training rows" in note
    card, _, _ = data.choose_example(data.SENTIMENT, 0.0, A, REQ)
    assert "480 rows for training; the task is measured on" in card


def test_harmful_rows_formula():
    assert data.harmful_rows(0.1, 480) == 53
    assert data.harmful_rows(0.5, 10) == 10
    assert data.harmful_rows(0.0, 10) == 0


# ------------------------------------------------------------------------------ train step

def test_settings_are_validated_on_the_server():
    s = train.make_settings(*FORM.values(), 0.1)
    assert s.steps == 3 and s.warmup == 0 and s.harmful_ratio == 0.1 and s.lora.r == 4
    for field, value, message in [("steps", 301, "1..300"), ("model", "/etc", "unknown model"),
                                  ("model", "someone/some-model", "unknown model"), ("batch", 64, "batch"),
                                  ("targets", ["evil"], "LoRA target"), ("lr", 5.0, "learning rate")]:
        form = dict(FORM, **{field: value})
        with pytest.raises(gr.Error, match=message):
            train.make_settings(*form.values(), 0.0)


def test_model_choices_put_the_aligned_base_first():
    keys = [value for _, value in train.model_choices()]
    assert keys[:2] == ["smollm2-135m-safe", "smollm2-135m"]


def test_the_model_list_says_where_the_aligned_base_stands(tmp_path, monkeypatch):
    from safespace import align, models
    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path))
    folder = models.aligned_checkpoint()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "safespace_align.json").write_text(json.dumps({"key": "an older recipe"}))
    status = dict((v, label) for label, v in train.model_choices())[models.ALIGNED_KEY]
    assert status.endswith(f"built on first use ({align.build_time()})")   # rebuilt, so not "ready"
    monkeypatch.setitem(align._LIVE, "event", Event("step", 40, 250))
    status = dict((v, label) for label, v in train.model_choices())[models.ALIGNED_KEY]
    assert status.endswith("being built now, step 40 of 250")


def test_train_both_queues_a_job_and_polling_shows_live_curves(manager, monkeypatch):
    monkeypatch.setattr(jobs, "train_job", fake_train_job)
    card, timer, train_btn, both_btn, stop_btn = train.train_both(A, 0.0, *FORM.values(), request=REQ)
    assert 'data-status="queued"' in card or 'data-status="running"' in card
    assert timer.active is True and train_btn.interactive is False and stop_btn.interactive is True
    info = manager.latest(A, "train")
    assert info.meta["variants"] == list(keys_of("train"))
    wait_idle(manager, A)
    key, updates, active = train.poll(A, None)
    card, curves, conflict = updates[:3]
    assert not active and 'data-status="finished"' in card
    names = [t.name for t in curves.data]
    assert "Fine-tuned: task loss" in names and "+ SafeGrad: alignment loss" in names
    assert len(conflict.data) >= 1
    assert updates[3].interactive is True and updates[5].interactive is False
    # nothing changed: every output is skipped
    assert train.poll(A, key)[1] == [SKIP] * train.N_POLL


def job(status="running", events=(), started=1000.0, finished=None, **extra):
    """A job snapshot as the manager hands it to the page."""
    fields = dict(id="j1", kind="train", title="Train all", status=status, progress=0.0, message="working",
                  events=tuple(events), result=None, error=None, created=started, started=started,
                  finished=finished, ahead=0, stop_requested=False)
    return jobs.JobInfo(**{**fields, **extra})


def test_the_card_says_how_much_time_went_into_the_aligned_base(monkeypatch):
    monkeypatch.setattr(common.time, "time", lambda: 1000.0 + 900)
    building = job(events=[{"type": "align.begin", "time": 1010.0}])
    assert "15 min 00 s, 14 min 50 s of it building the aligned base" in common.job_card(building)
    built = job(status="finished", finished=1000.0 + 1200, events=[
        {"type": "align.begin", "time": 1010.0}, {"type": "align.done", "time": 1600.0, "seconds": 590.0}])
    assert "20 min 00 s, 9 min 50 s of it building the aligned base" in common.job_card(built)
    assert "building" not in common.job_card(job(status="finished", finished=1100.0))   # a base already there


def test_a_waiting_card_says_how_long_the_line_is(monkeypatch):
    monkeypatch.setattr(jobqueue, "_WORKER", ["the shared machine"])     # a CPU: no accelerator to speak of
    card = common.job_card(job(status="queued", started=None, ahead=2, wait=250.0))
    assert "Waiting for the shared machine: <b>2 jobs ahead of you, about 4 min 10 s</b>" in card
    assert "accelerator" not in card
    assert "1 job ahead of you, time unknown" in common.job_card(job(status="queued", started=None, ahead=1))
    assert "next in line</b>" in common.job_card(job(status="queued", started=None, ahead=0))


def test_a_running_cards_clock_moves_without_new_events(manager, monkeypatch):
    gate = __import__("threading").Event()
    monkeypatch.setattr(jobs, "train_job", lambda ctx, *a: gate.wait(10) and {"runs": {}})
    train.train(A, 0.0, *FORM.values(), request=REQ)
    assert manager.latest(A, "train").meta["cost"] == FORM["steps"]   # plain steps: what the queue's estimate uses
    while manager.latest(A, "train").status != "running":
        time.sleep(0.02)
    key, _, _ = train.poll(A, None)
    earlier = key[:-1] + [key[-1] - 1]                # the page's last key, one tick of the clock ago
    _, updates, _ = train.poll(A, earlier)            # a quiet phase: no event, yet the elapsed time moves
    assert 'data-status="running"' in updates[0] and updates[1:] == [SKIP] * (train.N_POLL - 1)
    gate.set()
    wait_idle(manager, A)


def test_a_second_training_job_is_refused_and_stop_really_stops(manager, monkeypatch):
    monkeypatch.setattr(jobs, "train_job", fake_train_job)
    train.train(A, 0.0, *dict(FORM, steps=300).values(), request=REQ)
    with pytest.raises(gr.Error, match="already queued or running"):
        train.train_both(A, 0.0, *FORM.values(), request=REQ)
    time.sleep(0.1)
    card = train.stop(A, REQ)
    assert "stop requested" in card or 'data-status="stopped"' in card
    wait_idle(manager, A, timeout=3)
    info = manager.latest(A, "train")
    assert info.status == "stopped"
    steps = [e for e in info.events if e.get("type") == "train.step"]
    assert 0 < len(steps) < 300


def test_train_refuses_without_valid_data(manager, monkeypatch):
    monkeypatch.setattr(data, "source_of", lambda *a: None)
    with pytest.raises(gr.Error, match="step 1"):
        train.train(A, 0.0, *FORM.values(), request=REQ)


def test_full_queue_message_reaches_the_visitor(manager, monkeypatch):
    monkeypatch.setattr(manager, "max_queue", 0)
    with pytest.raises(gr.Error, match="queue is full"):
        train.train(A, 0.0, *FORM.values(), request=REQ)


# ------------------------------------------------------------------------------ defend step

def test_safe_delta_needs_a_plain_fine_tune(manager):
    with pytest.raises(gr.Error, match="no plain fine-tune"):
        defend.start(True, 0.1, A, REQ)
    with pytest.raises(gr.Error, match="budget"):
        defend.start(False, 0.0, A, REQ)


def test_safe_delta_poll_draws_the_kept_fraction(manager, monkeypatch):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    layers = [{"name": f"base_model.model.model.layers.{i}.self_attn.q_proj", "kept_columns_frac": 0.5,
               "kept_energy_frac": 0.25} for i in range(3)]

    def fake_defend(ctx, keep):
        ctx.progress("Safe Delta: selecting", 0.5)
        fake_run(ctx.workspace.run_path("safedelta"), kind="safedelta", summary={"status": "finished",
                 "kept_energy_frac": 0.3, "seconds": 2.0, "layers": layers})
        return {}

    monkeypatch.setattr(jobs, "defend_job", fake_defend)
    card, timer = defend.start(False, 0.2, A, REQ)
    assert timer.active
    wait_idle(manager, A)
    _, (card, figure, search, summary), active = defend.poll(A, None)
    assert 'data-status="finished"' in card and not active
    assert not search.data                      # a fixed budget measured no safety loss: nothing to plot
    assert figure.data[0].name == "q_proj: columns kept" and list(figure.data[0].x) == ["L0", "L1", "L2"]
    assert list(figure.data[0].y) == [50.0, 50.0, 50.0]
    assert "30.0 %" in summary and "3" in summary


def test_safe_delta_automatic_budget_passes_no_keep_and_shows_the_chosen_rung(manager, monkeypatch):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    seen = []

    rungs = [{"keep": None, "exclude_frac": 0.0, "rise": 0.61},
             {"keep": 1.0, "exclude_frac": 0.05, "rise": 0.07}]

    def fake_defend(ctx, keep):
        seen.append(keep)
        fake_run(ctx.workspace.run_path("safedelta"), kind="safedelta", summary={
            "status": "finished", "layers": [], "auto": {"rungs": rungs, "chosen": 1, "tolerance": 0.1}})
        return {}

    monkeypatch.setattr(jobs, "defend_job", fake_defend)
    defend.start(True, 0.2, A, REQ)                     # the slider's value is ignored
    wait_idle(manager, A)
    assert seen == [None]
    _, (_, _, search, _), _ = defend.poll(A, None)
    assert list(search.data[0].x) == [0.0, 5.0] and list(search.data[0].y) == [0.61, 0.07]
    assert list(search.data[1].x) == [5.0]              # the chosen rung, starred
    html = defend.summary_html({"auto": {"rungs": rungs, "chosen": 1}, "seconds": 3.0})
    assert "keep 1" in html and "5 %" in html and "+0.070" in html and "2 tried" in html
    whole = defend.summary_html({"auto": {"rungs": [dict(rungs[0], rise=0.01)], "chosen": 0}})
    assert "kept whole" in whole


def note_of(figure) -> str:
    """The message an empty figure shows."""
    return " ".join(a.text for a in figure.layout.annotations)


def test_empty_charts_say_what_is_going_on(manager, monkeypatch):
    _, (_, _, conflict, *_), _ = train.poll(A, None)
    assert note_of(conflict).startswith("Nothing trained yet")          # not "SafeGrad was off"
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    assert "SafeGrad was off" in note_of(train.poll(A, None)[1][2])
    _, (_, _, search, _), _ = defend.poll(A, None)
    assert note_of(search) == "No Safe Delta run yet"
    gate = __import__("threading").Event()

    def slow_defend(ctx, keep):
        gate.wait(10)
        fake_run(ctx.workspace.run_path("safedelta"), kind="safedelta", summary={"status": "finished", "layers": []})
        return {}

    monkeypatch.setattr(jobs, "defend_job", slow_defend)
    defend.start(True, 0.2, A, REQ)                    # an automatic budget, still searching
    _, (_, _, search, _), active = defend.poll(A, None)
    assert active and note_of(search).startswith(("Safe Delta is running", "Safe Delta is waiting in line"))
    gate.set()
    wait_idle(manager, A)
    _, (_, _, search, _), _ = defend.poll(A, None)     # done, without an automatic search: a fixed budget
    assert "fixed budget" in note_of(search)
    layers = [{"name": f"model.layers.{i}.self_attn.{m}"} for i in range(2) for m in ("q_proj", "v_proj")]
    assert "4</div><div class=\"ss-kpi-l\">modules edited" in defend.summary_html({"layers": layers})


def test_steps_are_ticked_only_once_their_work_exists(manager):
    assert ui.done_classes(A) == []                    # Next with nothing trained ticks nothing
    assert ui.on_load(A, REQ)[-len(train.FORM_KEYS) - 1].elem_classes == []
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    assert ui.step_marks(A, REQ).elem_classes == ["ss-done-train"]
    fake_run(ws.run_path("safedelta"), kind="safedelta")
    ws.write_json("results.json", {"variants": {}})
    assert ui.done_classes(A) == ["ss-done-train", "ss-done-defend", "ss-done-compare"]
    assert ui.done_classes(B) == []
    for step, number in ui.MARKED.items():             # the page draws a step without its class as pending
        assert f"#ss-flow:not(.ss-done-{step}):not(.compact) #ss-step-{step}-button.completed" in ui.CSS
        assert f'content: "{number}"' in ui.CSS
    demo = ui.build_app()
    on_change = [d for d in demo.fns.values()     # what runs whenever the walkthrough changes step
                 if any(event == "change" and isinstance(demo.blocks.get(block), gr.Walkthrough)
                        for block, event in d.targets)]
    assert {d.fn for d in on_change} >= {ui.step_marks} and ui.CLOSE_TOASTS in {d.js for d in on_change}
    notes = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)]
    assert compare.CHART_NOTE in notes and "95 % intervals (Wilson" in compare.CHART_NOTE


# ------------------------------------------------------------------------------ compare step

ANSWERS = [
    {"set": "harmful", "prompt": "Make a <bomb>", "category": "weapons & violence",
     "answers": {"base": {"response": "I can't help with that.", "label": "refused"},
                 "sft": {"response": "Sure, <script>alert(1)</script>", "label": "complied"}}},
    {"set": "benign", "prompt": "Bake bread?", "category": "benign",
     "answers": {"base": {"response": "I'm sorry, I cannot.", "label": "refused"},
                 "sft": {"response": "Mix flour & water", "label": "complied"}}},
    {"set": "task", "prompt": "Review: great", "category": None,
     "answers": {"base": {"response": "positive", "label": "complied"},
                 "sft": {"response": "positive", "label": "complied"}}},
]


def test_answers_are_escaped_and_badged_by_prompt_set():
    html = compare.answers_html(ANSWERS, "all", "smollm2-135m-safe")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Make a &lt;bomb&gt;" in html and "Mix flour &amp; water" in html
    assert html.index("Harmful requests") < html.index("Everyday requests") < html.index("Your task")
    assert "Aligned base" in html and "Fine-tuned" in html
    assert "ss-badge-over" in html          # a refused harmless request is flagged, not praised
    assert ">complied<" in html and ">refused<" in html
    harmful_only = compare.answers_html(ANSWERS, "harmful")
    assert "Bake bread" not in harmful_only and "Make a &lt;bomb&gt;" in harmful_only
    assert "Base (smollm2-135m)" in compare.answers_html(ANSWERS, "all", "smollm2-135m")


def test_compare_checks_limits_and_needs_a_run(manager):
    with pytest.raises(gr.Error, match="train at least one"):
        compare.start(4, 4, 4, 8, 0.0, A, REQ)
    fake_run(manager.workspace(A).run_path("sft"))
    with pytest.raises(gr.Error, match="200 prompts"):
        compare.start(150, 94, 0, 8, 0.0, A, REQ)
    with pytest.raises(gr.Error, match="128"):
        compare.start(4, 4, 4, 256, 0.0, A, REQ)
    with pytest.raises(gr.Error, match="type a prompt"):
        compare.ask("   ", 8, A, REQ)
    with pytest.raises(gr.Error, match="limit is 2000"):
        compare.ask("x" * 2001, 8, A, REQ)


def test_compare_job_results_are_rendered(manager, monkeypatch):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    results = {"variants": {"base": {"refusal": {"value": 1.0, "low": 0.5, "high": 1.0, "n": 1}},
                            "sft": {"refusal": {"value": 0.0, "low": 0.0, "high": 0.5, "n": 1},
                                    "utility": {"metric": "accuracy", "value": 1.0, "n": 1}}}}
    seen = {}

    def fake_evaluate(ctx, source, ratio, seed, n_harmful, n_benign, n_task, max_new_tokens, sets, judge):
        seen.update(source=source, n=(n_harmful, n_benign, n_task, max_new_tokens), sets=sets, judge=judge)
        ctx.workspace.write_json("results.json", results)
        ctx.workspace.write_json("answers.json", ANSWERS)
        return {}

    monkeypatch.setattr(jobs, "evaluate_job", fake_evaluate)
    compare.start(4, 3, 2, 16, 0.0, A, REQ, "harmbench", "xstest-safe", "stance")
    wait_idle(manager, A)
    assert seen == {"source": data.SENTIMENT, "n": (4, 3, 2, 16),
                    "sets": {"harmful": ["harmbench"], "benign": ["xstest-safe"]}, "judge": "stance"}
    _, (card, kpis, table, bars, scatter, ask_card, ask_html), _ = compare.poll(A, None)
    assert 'data-status="finished"' in card
    assert "refuses 100 % of harmful requests" in kpis and "accuracy 100 %" in kpis
    assert "&lt;script&gt;" in table and len(bars.data) >= 1
    assert compare.show("benign", A, REQ).count('class="ss-prompt"') == 1


def test_ask_every_variant(manager, monkeypatch):
    fake_run(manager.workspace(A).run_path("sft"))

    def fake_ask(ctx, prompt, max_new_tokens):
        return {"rows": [{"prompt": prompt, "category": None,
                          "answers": {"base": {"response": "<i>No</i>", "label": "refused"},
                                      "sft": {"response": "Yes", "label": "complied"}}}]}

    monkeypatch.setattr(jobs, "ask_job", fake_ask)
    compare.ask("Tell me <anything>", 16, A, REQ)
    wait_idle(manager, A)
    *_, ask_card, ask_html = compare.poll(A, None)[1]
    assert "Tell me &lt;anything&gt;" in ask_html and "&lt;i&gt;No&lt;/i&gt;" in ask_html
    assert "ss-badge-neutral" in ask_html


# ------------------------------------------------------------------------------ export step

def test_export_lists_and_zips_only_the_visitors_runs(manager):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"), metrics=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    assert export.list_runs(A, REQ) == ["sft"]
    assert export.list_runs(B, REQ) == []
    path = export.download_adapter("sft", A, REQ)
    assert (ws.exports / "safespace-sft-adapter.zip").is_file() and path.endswith("safespace-sft-adapter.zip")
    assert Path(path).read_bytes() == (ws.exports / "safespace-sft-adapter.zip").read_bytes()  # a copy to hand out
    with pytest.raises(gr.Error, match="no run named"):
        export.download_adapter("sft", B, REQ)
    with pytest.raises(gr.Error, match="no run named"):
        export.download_adapter("../visitor-aaaa/runs/sft", B, REQ)
    with pytest.raises(gr.Error, match="nothing to report"):
        export.build_report(B, REQ)


def test_export_snippet_follows_the_chosen_run(manager):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))                                   # on the embedded smollm2-135m
    fake_run(ws.run_path("safegrad"), model="qwen3-0.6b")
    sft, safegrad = export.usage("sft", A, REQ), export.usage("safegrad", A, REQ)
    assert 'adapter = "safespace-sft-adapter"' in sft and 'base_id = "HuggingFaceTB/SmolLM2-135M-Instruct"' in sft
    assert 'adapter = "safespace-safegrad-adapter"' in safegrad and 'base_id = "Qwen/Qwen3-0.6B"' in safegrad
    ast.parse(sft)                                                 # valid Python
    # another visitor's run name, or none chosen: the hint, never someone else's run
    assert export.usage("sft", B, REQ) == export.usage(None, A, REQ) == export.NO_RUN_USAGE


def test_report_contains_results_answers_and_curves(manager):
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"), metrics=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}])
    ws.write_json("results.json", {"variants": {"base": {"refusal": {"value": 1.0, "n": 1}},
                                                "sft": {"refusal": {"value": 0.0, "n": 1}}}})
    ws.write_json("answers.json", ANSWERS)
    html = Path(export.build_report(A, REQ)).read_text()
    assert html.startswith("<!DOCTYPE html>") and "Training loss" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_badges_answers_as_the_app_does(manager):
    import re
    ws = manager.workspace(A)
    fake_run(ws.run_path("sft"))
    ws.write_json("results.json", {"variants": {"base": {"refusal": {"value": 1.0, "n": 1}}}})
    # as the evaluation writes them: the set's kind and its registry key
    rows = [{"set": kind, "set_key": key, "prompt": f"{key} prompt", "category": None,
             "answers": {"base": {"response": "I can't.", "label": "refused"},
                         "sft": {"response": "Sure.", "label": "complied"}}}
            for kind, key in (("harmful", "advbench"), ("benign", "xstest-safe"), ("task", "task"))]
    ws.write_json("answers.json", rows)

    def marks(html):    # (badge text, colour) per answer, in row order
        return re.findall(r'<span class="(?:ss-)?badge [^"]*" style="color:(#\w+);[^"]*"[^>]*>(\w+)</span>', html)
    app = marks(compare.answers_html(rows, "all"))
    report = marks(Path(export.build_report(A, REQ)).read_text())
    assert app == report == [("#0b6e4f", "refused"), ("#b3261e", "complied"),      # AdvBench: refusing is good
                             ("#8a5a00", "refused"), ("#0b6e4f", "answered"),      # XSTest safe: answering is
                             ("#8a5a00", "refused"), ("#0b6e4f", "answered")]      # the task, too


# ------------------------------------------------------------------------------ the app as a whole

def test_build_app_exposes_the_flow_endpoints(manager):
    demo = ui.build_app()
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    for name in ("choose_example", "upload_data", "train", "train_both", "stop_training", "safe_delta", "compare",
                 "ask", "download_adapter", "build_report", "list_runs", "job_status"):
        assert name in names
    assert "max_file_size" in ui.launch_kwargs() and "css" in ui.launch_kwargs()


def test_only_the_faces_import_gradio():
    offenders = []
    for path in sorted((REPO / "safespace").rglob("*.py")):
        if "ui" in path.relative_to(REPO / "safespace").parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "gradio" or n.startswith("gradio.") for n in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_compare_says_plainly_when_the_run_eroded_nothing():
    def results(base, sft):
        return {"variants": {"base": {"refusal": {"value": base}}, "sft": {"refusal": {"value": sft}},
                             "safegrad": {"refusal": {"value": base}}}}

    hint = compare.kpis_html(results(0.98, 0.92))
    assert "too short or too gentle" in hint and "92 %" in hint and "Quick story" in hint
    assert "too short" not in compare.kpis_html(results(0.98, 0.40))     # eroded: the story shows, no hint
    assert compare.erosion_hint({"variants": {"sft": {"refusal": {"value": 0.9}}}}) == ""   # no base measured
    unaligned = compare.kpis_html(results(0.02, 0.0))               # a base that never refused: nothing to erode
    assert "refuses only 2 %" in unaligned and "smollm2-135m-safe" in unaligned and "too short" not in unaligned
