"""README: how a client renders a task's prompt itself for /v1/completions `prompt`, and that recipe is what `input` gets."""

import json
from pathlib import Path

from adapterhub_lite.core.data import render
from adapterhub_lite.core.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_readme_says_how_to_render_a_prompt_and_the_recipe_holds():
    readme = " ".join(ROOT.joinpath("README.md").read_text().split())
    assert "`task.prompt` in the version's `adapterhub.json`" in readme
    assert "`adapterhub_lite.core.data.render(spec, row)`" in readme
    # the recipe as written (template filled with stripped columns) is what render gives, whitespace and all
    task = json.loads(ROOT.joinpath("adapters/date_iso/1.1.0/adapterhub.json").read_text())["task"]
    row = {"text": " the 3rd of March, 2021\n"}
    assert render(spec_from_dict(task), row) == task["prompt"].format(text="the 3rd of March, 2021")
