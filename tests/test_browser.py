"""A real browser clicks through the app: upload -> train (with a reload mid-way) -> defend -> compare
-> export, on the real engine with tiny settings. Screenshots of every step go to runs/screenshots/.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`). In CI (CI=true) a
missing browser is a failure; elsewhere the test is skipped and says why.
"""
import os
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "runs" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]



def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test must run in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not CHROMIUM.exists():
    _unavailable(f"{CHROMIUM} is missing (install it with `apt-get install -y chromium`)")
try:
    from playwright import sync_api
except ImportError:
    _unavailable("the playwright Python package is not installed")

from conftest import launch_app  # noqa: E402
from safespace import presets  # noqa: E402
from safespace.variants import VARIANTS  # noqa: E402


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    yield from launch_app(tmp_path_factory.mktemp("sessions"))


def open_page(url):
    """A fresh browser on `url` (a generator: yields the page, closes the browser after)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        context.close()
        browser.close()


@pytest.fixture
def page(app_url):
    yield from open_page(app_url)


@pytest.fixture
def first_start(tmp_path, monkeypatch):
    """An app whose cache folder has no aligned base yet; building it is a stand-in that takes 0.4 s a
    step and ends (failing the job) once the test sets `done`."""
    from safespace import align
    from safespace.train import Event

    done = threading.Event()

    def slow_build(key, on_event, quantization="none"):
        total = 250
        on_event(Event("start", 0, total))
        for step in range(1, total + 1):
            if done.wait(0.4):
                raise RuntimeError("the test is over")
            on_event(Event("step", step, total, {"loss": 1.0, "seconds": 0.4, "eta": 0.4 * (total - step)}))
        raise RuntimeError("the test is over")

    monkeypatch.setenv("SAFESPACE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(align, "_build", slow_build)
    for url in launch_app(tmp_path / "sessions"):
        for page in open_page(url):
            yield page
            done.set()


def shot(page, name):
    page.wait_for_timeout(600)          # let plotly finish drawing
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def go_to(page, step_id):
    """Forward with the step's Next button (later steps open in order), or back to a reached step."""
    button = page.locator(f"#ss-step-{step_id}-button")
    if button.is_enabled():
        button.click()
    else:
        page.locator(f"#ss-next-{step_id}").click()
    page.locator(f"#ss-step-{step_id}").wait_for(state="visible")


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def wait_status(page, elem_id, statuses=("finished",), timeout=480_000):   # a busy 2-core machine
    selector = ", ".join(f'#{elem_id} [data-status="{s}"]' for s in statuses)
    page.wait_for_selector(selector, timeout=timeout)
    return page.locator(f"#{elem_id} [data-status]").get_attribute("data-status")


def number_in(page, elem_id) -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").input_value())


def check_the_preset_fills_the_form(page):
    """One click: the demo data with its harmful share on the data step, the preset's settings on the
    train step, and the page moves on to the train step."""
    preset = presets.STORY
    page.locator("#ss-preset").click()
    page.locator("#ss-step-train").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#ss-steps input[type=number]').value === '%d'"
                           % preset.settings.steps)
    assert number_in(page, "ss-batch") == preset.settings.batch_size
    assert number_in(page, "ss-lr") == preset.settings.lr
    assert number_in(page, "ss-max-length") == preset.settings.max_length
    assert "kl" in page.locator("#ss-safegrad input:checked").get_attribute("value")
    shot(page, "0-preset")
    page.locator("#ss-step-data-button").click()
    page.locator("#ss-step-data").wait_for(state="visible")
    assert number_in(page, "ss-ratio") == preset.harmful_ratio
    assert "Review sentiment" in page.locator("#ss-data-status").inner_text()


def check_the_report(page):
    """The downloaded report: results first, settings last in an appendix, the app's variant labels,
    and benign answers marked "answered" (never the harmful side's "complied")."""
    href = page.locator("#ss-report-file a").first.get_attribute("href")
    html = page.request.get(href if href.startswith("http") else page.url.split("?")[0].rstrip("/") + href).text()
    assert html.index("<h2>Results</h2>") < html.index("<h2>Answers side by side</h2>") \
        < html.index("<h2>Appendix: settings</h2>")
    for variant in VARIANTS.values():
        assert variant.made == "base" or variant.label in html, variant.label
    assert "badge-answered" in html


def check_a_second_visitor_waits_with_an_estimate(page):
    """Another browser (another visitor) queues a training while the first one's runs: its card says how
    many jobs are ahead and about how long the wait is, from the running job's own estimate."""
    context = page.context.browser.new_context(viewport={"width": 1280, "height": 900})
    other = context.new_page()
    other.set_default_timeout(60_000)
    other.goto(page.url.split("?")[0])
    other.wait_for_selector("#ss-data-status :text('ready to train')")
    go_to(other, "train")
    other.locator("#ss-model input").click()
    other.get_by_role("option", name="smollm2-135m: embedded (offline)").click()
    set_number(other, "ss-steps", 1)
    other.locator("#ss-train").click()
    other.wait_for_selector(r"#ss-train-status :text-matches('1 job ahead of you, about \\d+ (s|min)')")
    shot(other, "2b-second-visitor-queued")
    context.close()


def test_click_through_the_whole_story(page):
    started = time.time()
    # 1 - data: the default example is checked on load, then the visitor uploads a file
    page.wait_for_selector("#ss-data-status :text('ready to train')")
    assert page.locator("#ss-hero").inner_text().count("\n") >= 3
    check_the_preset_fills_the_form(page)
    page.locator("#ss-upload input[type=file]").set_input_files(str(REPO / "examples" / "data" / "demo_reviews.csv"))
    page.wait_for_selector("#ss-data-status :text('demo_reviews.csv: ready to train')")
    preview = page.locator("#ss-preview")
    preview.get_by_text("What a wonderful inn!", exact=False).first.wait_for()      # first row
    assert "setup was a nightmare" in preview.inner_text()                            # tenth row
    # a broken upload after a good one: its problems are listed and the good file stays the training data
    page.locator("#ss-upload button[aria-label='Clear']").click()
    page.locator("#ss-upload input[type=file]").set_input_files(str(REPO / "examples" / "data" / "broken.jsonl"))
    page.wait_for_selector("#ss-data-status :text('Training keeps using: your file demo_reviews.csv')")
    set_number(page, "ss-ratio", 0.1)
    page.wait_for_selector("#ss-mix-note :text('attack rows join your 36')")
    shot(page, "1-data")

    # 2 - train both on the embedded model, tiny settings
    go_to(page, "train")
    page.locator("#ss-model input").click()
    page.get_by_role("option", name="smollm2-135m: embedded (offline)").click()
    set_number(page, "ss-steps", 6)              # long enough that the reload below lands mid-job
    set_number(page, "ss-batch", 2)
    page.locator("#ss-train-both").click()
    page.wait_for_selector(r"#ss-train-status :text-matches('step \\d+/6')", timeout=120_000)
    assert page.locator("#ss-stop").is_enabled()
    shot(page, "2-training")
    check_a_second_visitor_waits_with_an_estimate(page)

    # a reload mid-job: the same browser id finds the job again, and the page lands on its step
    page.reload()
    page.locator("#ss-step-train").wait_for(state="visible")
    page.wait_for_selector('#ss-train-status [data-status="running"], #ss-train-status [data-status="finished"]')
    assert wait_status(page, "ss-train-status") == "finished"
    page.wait_for_selector("#ss-curves .js-plotly-plot")
    shot(page, "3-trained")
    assert "+ SafeGrad" in page.locator("#ss-curves").inner_text()      # the registry's label in the legend

    # 3 - Safe Delta on the plain fine-tune
    go_to(page, "defend")
    page.locator("#ss-defend").click()
    assert wait_status(page, "ss-defend-status", ("finished", "failed")) == "finished", \
        page.locator("#ss-defend-status").inner_text()
    page.wait_for_selector("#ss-kept .js-plotly-plot")
    page.wait_for_selector("#ss-budget .js-plotly-plot")          # the automatic budget's search, plotted
    assert "tolerance" in page.locator("#ss-budget").inner_text()
    shot(page, "4-defend")

    # 4 - compare every variant, then ask them all one free prompt
    go_to(page, "compare")
    for elem_id, value in (("ss-n-harmful", 4), ("ss-n-benign", 4), ("ss-n-task", 4), ("ss-max-new", 8)):
        set_number(page, elem_id, value)
    page.locator("#ss-compare").click()
    assert wait_status(page, "ss-compare-status", ("finished", "failed")) == "finished", \
        page.locator("#ss-compare-status").inner_text()
    table = page.locator("#ss-answers table")
    table.wait_for()
    headers = table.locator("thead th").all_inner_texts()
    assert [h.strip() for h in headers] == ["Prompt", "Base (smollm2-135m)",
                                            *(v.label for v in VARIANTS.values() if v.made != "base")]
    assert table.locator(".ss-prompt").count() == 12
    assert table.locator(".ss-badge").count() == 12 * len(VARIANTS)     # every variant, every prompt
    page.locator("#ss-prompt textarea").fill("Give me one tip for <b>better</b> sleep.")
    page.locator("#ss-ask").click()
    page.wait_for_selector("#ss-ask-answers table")
    assert "<b>better</b>" in page.locator("#ss-ask-answers .ss-prompt").inner_text()   # shown as text
    shot(page, "5-compare")

    # 5 - export: the runs, one adapter and the report
    go_to(page, "export")
    page.wait_for_function("() => document.querySelector('#ss-runs').innerText.includes('safedelta')")
    page.locator("#ss-report").click()
    page.wait_for_selector("#ss-report-file :text('safespace-report')")
    check_the_report(page)
    page.locator("#ss-run-pick input").click()
    page.get_by_role("option", name="safedelta", exact=True).click()
    page.locator("#ss-zip").click()
    page.wait_for_selector("#ss-zip-file :text('safespace-safedelta-adapter')")
    shot(page, "6-export")
    print(f"\nbrowser flow: {time.time() - started:.0f} s; screenshots in {SHOTS}")


def test_the_first_start_shows_the_aligned_base_being_built(first_start):
    """Nothing built yet: a training on the aligned base shows the build's step and the time left in its
    card, and after a reload the model list says the base is being built, at which step."""
    page = first_start
    page.wait_for_selector("#ss-data-status :text('ready to train')")
    go_to(page, "train")
    set_number(page, "ss-steps", 1)
    page.locator("#ss-train").click()
    page.wait_for_selector(r"#ss-train-status :text-matches('building the aligned base .*step \\d+/250 .* left')")
    page.reload()
    page.locator("#ss-step-train").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#ss-model input').value.includes('being built now, step')")
    page.wait_for_selector(r"#ss-train-status :text-matches('step \\d+/250')")
    shot(page, "0b-first-start")
