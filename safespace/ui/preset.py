"""The one-click preset: fills the data step and the train form with settings that show the story fast."""
from __future__ import annotations

import gradio as gr

from .. import presets
from . import common
from . import data as data_step
from . import train as train_step


def blurb(preset: presets.Preset = presets.STORY) -> str:
    return (f"**New here? {preset.label}.** One click picks the demo data with {preset.harmful_ratio:.0%} harmful "
            f"rows and fills the training form with short, fast settings: about **{preset.minutes:g} min** of "
            f"training for *Train all* on a 2-core CPU. {preset.note}")


def apply(visitor=None, request: gr.Request = None, key: str = presets.STORY.key) -> list:
    """[example, data card, preview, mix note, *train form (ratio first), walkthrough step]."""
    preset = presets.get(key)
    card, rows, note = data_step.choose_example(preset.data, preset.harmful_ratio, visitor, request)
    values = train_step.form_values(preset.settings)          # the harmful-mix slider first
    form = [values[k] for k in train_step.FORM_KEYS]
    gr.Info(f"{preset.label} loaded: press Train all (about {preset.minutes:g} min of training).")
    return [preset.data, card, rows, note, *form, gr.Walkthrough(selected=2)]


def button() -> gr.Button:
    """The preset's button with its one-paragraph explanation (placed by the data step)."""
    with gr.Row(equal_height=True, elem_id="ss-preset-row"):
        gr.Markdown(blurb(), elem_classes=["ss-explain"], padding=True)
        return gr.Button(f"⚡ {presets.STORY.label}", variant="primary", scale=0, min_width=180,
                         elem_id="ss-preset")


def wire(btn: gr.Button, shared: common.Shared, data_ui: dict, train_form: list) -> None:
    """Outputs: the data step's example, card, preview and mix note; the train form; the walkthrough."""
    outputs = [data_ui["example"], data_ui["status"], data_ui["preview"], data_ui["note"], *train_form, shared.flow]
    btn.click(apply, [shared.visitor], outputs, api_name="apply_preset", show_progress="minimal")
