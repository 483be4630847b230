"""The adapter's README.md: huggingface_hub's ModelCard metadata (what the Hub indexes) over the usage and results body."""

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load

from adapterhub_lite.artifacts.files import atomic_write
from adapterhub_lite.artifacts.folder import model_card

ADAPTERS = Path(__file__).parent.parent / "adapters"


@pytest.mark.parametrize("name", ["sst2", "ag_news", "person_json"])  # classification (ag_news: its two metrics differ), generation
def test_the_card_parses_back_with_its_eval_results_and_base_model(tmp_path, name):
    meta = json.loads((ADAPTERS / name / "1.1.0" / "adapterhub.json").read_text())
    atomic_write(tmp_path / "README.md", model_card(meta))
    card = ModelCard.load(tmp_path / "README.md")  # a local path: no Hub call
    data = card.data
    assert data.library_name == "peft" and data.base_model == meta["base"]["hub_id"]
    assert data.tags == ["adapterhub_lite", meta["task"]["method"], meta["task"]["type"], name, f"base_model:adapter:{meta['base']['hub_id']}"]
    assert data.model_name == f"{name}-{meta['task']['method']}"
    results = {(r.metric_type, r.metric_value) for r in data.eval_results}
    assert results == {(m, meta["metrics"][m]) for m in meta["task"]["metric"]} and all(r.dataset_split == "dev" for r in data.eval_results)
    assert {r.task_type for r in data.eval_results} == {"text-generation" if name == "person_json" else "text-classification"}
    # the header says what the published, hand-built one said (that card stays as published: the registry hashes it),
    # plus the pipeline tag and base_model:adapter tag added since
    header = data.to_dict()
    del header["pipeline_tag"]
    header["tags"].pop()
    assert header == ModelCard((ADAPTERS / name / "1.1.0" / "README.md").read_text()).data.to_dict()
    for m in meta["task"]["metric"]:
        assert f"| {m} | {meta['metrics'][m]} |" in card.text
    assert 'PeftModel.from_pretrained(base, "path/to/this/folder")' in card.text and card.text.startswith(f"\n# {name} — ")


@pytest.mark.parametrize("quantization, dtype, says", [("8bit", "bf16", "a frozen 8bit backbone"), ("none", "fp32", "a frozen unquantized (fp32) backbone"),
                                                      ("none", None, "a frozen unquantized backbone")])  # None: a format-1 sidecar
def test_the_card_has_peft_s_pipeline_tag_and_adapter_tag_and_names_an_unquantized_backbone(tmp_path, quantization, dtype, says):
    """What peft's own save_pretrained card has (pipeline_tag, base_model:adapter:<base>), which the Hub reads for its
    inference widget and the base model's adapter list; and no 'frozen none backbone' for an unquantized run."""
    meta = json.loads((ADAPTERS / "sst2" / "1.1.0" / "adapterhub.json").read_text())
    meta["base"]["fingerprint"]["quantization"] = quantization
    if dtype:
        meta["base"]["dtype"] = dtype
    atomic_write(tmp_path / "README.md", model_card(meta))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in card.data.tags
    assert f"Trained with adapterhub_lite on {says}\n" in card.text and "frozen none" not in card.text


def test_a_local_backbone_path_stays_out_of_the_card_metadata(tmp_path):
    """The Hub checks a README's metadata on upload and refuses a base_model that is not a Hub model id: an adapter
    trained on a local backbone folder (its hub_id is that folder's absolute path) names the folder in the text only,
    with no base_model and no base_model:adapter tag; ModelCard and metadata_load read the same header."""
    meta = json.loads((ADAPTERS / "sst2" / "1.1.0" / "adapterhub.json").read_text())
    meta["base"]["hub_id"] = "/srv/models/my backbone"
    atomic_write(tmp_path / "README.md", model_card(meta))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and not [t for t in card.data.tags if t.startswith("base_model:")]
    assert card.data.to_dict() == metadata_load(tmp_path / "README.md") and card.data.library_name == "peft"
    assert "adapter for /srv/models/my backbone" in card.text and "names no base_model" in card.text


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_the_card_s_snippet_loads_the_base_in_the_dtype_it_was_trained_in(tmp_path, quantization):
    """transformers 5 loads a checkpoint in its config's dtype when none is passed (dtype="auto"), and the hub's
    SmolLM2 says bfloat16: the card's snippet names the recorded compute dtype (here fp32, the CPU's), so the base it
    loads computes as training did. Run on a copy of the tiny backbone whose config says bfloat16, as the hub's does."""
    import re

    import torch

    from adapterhub_lite.model.weights import resolve

    hub_like = tmp_path / "hub_like"
    shutil.copytree(resolve("tiny-random-llama")[0], hub_like)
    config = json.loads((hub_like / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (hub_like / "config.json").write_text(json.dumps(config))
    meta = json.loads((ADAPTERS / "sst2" / "1.1.0" / "adapterhub.json").read_text())
    meta["base"]["fingerprint"]["quantization"], meta["base"]["dtype"] = quantization, "fp32"
    code = re.search(r"```python\n(.*?)```", model_card(meta), re.S)[1].replace(meta["base"]["hub_id"], str(hub_like))
    names: dict = {}
    exec(code.split("model = PeftModel")[0], names)  # the snippet up to the adapter: the base it loads
    assert names["base"].get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("dtype, torch_name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_the_card_s_snippet_names_each_recorded_dtype_as_torch_does(tmp_path, dtype, torch_name):
    """A run trained in bf16 or fp16 (CUDA's auto dtypes): the snippet's base loads in that very dtype, not another
    half-precision one (the tiny backbone's config says float32, so only the snippet's argument can set it)."""
    import re

    import torch

    from adapterhub_lite.model.weights import resolve

    meta = json.loads((ADAPTERS / "sst2" / "1.1.0" / "adapterhub.json").read_text())
    meta["base"]["fingerprint"]["quantization"], meta["base"]["dtype"] = "none", dtype
    backbone = str(resolve("tiny-random-llama")[0])
    code = re.search(r"```python\n(.*?)```", model_card(meta), re.S)[1].replace(meta["base"]["hub_id"], backbone)
    names: dict = {}
    exec(code.split("model = PeftModel")[0], names)
    assert names["base"].get_input_embeddings().weight.dtype == getattr(torch, torch_name)
