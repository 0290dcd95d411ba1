"""blip2kit's own checkpoint format, blip2kit.json beside HF/LAVIS saves, run directories, and saves
that fail midway (the previous checkpoint must still load)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blip2kit.core import build_model, from_pretrained
from blip2kit.core.checkpoints import CheckpointError, latest_checkpoint, read_state
from blip2kit.plugins.language.testing import make_opt_tokenizer

TINY = "vit_tiny+qformer_tiny+opt_tiny"


def _equal_states(first, second, prefixes=("",)):
    a = {k: v for k, v in first.state_dict().items() if k.startswith(prefixes)}
    b = {k: v for k, v in second.state_dict().items() if k.startswith(prefixes)}
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    make_opt_tokenizer(directory)
    return directory


@pytest.fixture
def tiny(tokenizer_dir):
    model = build_model(TINY, language={"tokenizer": str(tokenizer_dir), "prompt": "a photo of",
                                        "max_text_length": 20})
    model.language.prompt = "a picture of"  # changed after building: the save must keep it
    _ = model.language.tokenizer  # loaded, so the save writes its files
    return model


def test_full_save_rebuilds_the_same_model(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "ckpt", format="blip2kit")
    description = json.loads((tmp_path / "ckpt" / "blip2kit.json").read_text())
    assert description["format"] == "blip2kit"
    assert {slot: entry["card"] for slot, entry in description["composition"].items()} == {
        "vision": "vit_tiny", "bridge": "qformer_tiny", "language": "opt_tiny"}
    assert description["saved_parts"] == ["vision", "bridge", "projection", "language"]
    # The file holds the model's own keys; tied OPT embeddings are stored once, as an alias.
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(stored) | set(description["tied_aliases"]) == set(tiny.state_dict())
    assert "language.model.lm_head.weight" in description["tied_aliases"]

    again = from_pretrained(tmp_path / "ckpt")
    _equal_states(tiny, again)
    assert again.language.model.lm_head.weight is again.language.model.get_input_embeddings().weight
    assert again.language.prompt == "a picture of" and again.language.max_text_length == 20
    assert again.vision.frozen and again.language.frozen and not again.bridge.frozen
    assert again.language.tokenizer("a red circle").input_ids == tiny.language.tokenizer("a red circle").input_ids
    pixels = torch.randn(2, 3, 112, 112)
    tiny.eval(), again.eval()
    assert torch.equal(tiny.soft_prompt(pixels)[0], again.soft_prompt(pixels)[0])
    assert again.load_report.notes == [] and not again.load_report.missing


def test_trainable_only_takes_frozen_towers_from_their_settings(tmp_path, tokenizer_dir):
    vision_file = tmp_path / "vision.pth"
    source = build_model("vit_tiny+qformer_tiny")
    torch.save(source.vision.export_external_state("lavis"), vision_file)
    model = build_model(TINY, vision={"pretrained": str(vision_file)},
                        language={"tokenizer": str(tokenizer_dir)})
    model.save_pretrained(tmp_path / "ckpt", format="blip2kit", trainable_only=True)

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert stored and all(key.startswith(("bridge.", "projection.")) for key in stored)
    with pytest.warns(UserWarning, match="language: random initialisation"):
        again = from_pretrained(tmp_path / "ckpt")
    _equal_states(model, again, ("bridge.", "projection.", "vision."))  # vision re-read from its file
    assert not torch.equal(model.language.model.lm_head.weight, again.language.model.lm_head.weight)
    notes = again.load_report.notes
    assert any(note.startswith("vision: from its pretrained setting") for note in notes)
    assert "language: random initialisation (no pretrained setting)" in notes


def test_stage1_model_round_trips(tmp_path):
    model = build_model("vit_tiny+qformer_tiny")
    model.save_pretrained(tmp_path / "s1", format="blip2kit")
    again = from_pretrained(tmp_path / "s1")
    assert again.language is None
    _equal_states(model, again)


@pytest.mark.parametrize("fmt", ["hf", "lavis"])
def test_hf_and_lavis_saves_restore_settings(tmp_path, tiny, fmt):
    tiny.save_pretrained(tmp_path / fmt, format=fmt)
    assert json.loads((tmp_path / fmt / "blip2kit.json").read_text())["format"] == fmt
    again = from_pretrained(tmp_path / fmt, **({} if fmt == "hf" else {}))
    assert again.language.prompt == "a picture of" and again.language.max_text_length == 20
    # HF holds everything; LAVIS only what trains (the towers come from their settings: random here).
    _equal_states(tiny, again, ("bridge.", "projection.") + (("vision.", "language.") if fmt == "hf" else ()))


def test_half_precision_towers_come_back_in_half(tmp_path, tokenizer_dir):
    model = build_model(TINY, dtype="bf16", language={"tokenizer": str(tokenizer_dir)})
    model.save_pretrained(tmp_path / "ckpt", format="blip2kit")
    again = from_pretrained(tmp_path / "ckpt")
    assert again.vision.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert again.bridge.query_tokens.dtype == torch.float32
    _equal_states(model, again)


def test_run_directory_resolves_to_newest_complete_checkpoint(tmp_path):
    model = build_model("vit_tiny+qformer_tiny")
    run = tmp_path / "run"
    model.save_pretrained(run / "checkpoints" / "step-00000010" / "model", format="blip2kit")
    with torch.no_grad():
        model.bridge.query_tokens.add_(1.0)
    model.save_pretrained(run / "checkpoints" / "step-00000020" / "model", format="blip2kit")
    (run / "checkpoints" / "step-00000030" / "model").mkdir(parents=True)  # incomplete: no blip2kit.json
    (run / "checkpoints" / ".step-00000040.tmp-x" / "model").mkdir(parents=True)
    assert latest_checkpoint(run) == run / "checkpoints" / "step-00000020" / "model"
    again = from_pretrained(run)
    assert torch.equal(again.bridge.query_tokens, model.bridge.query_tokens)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path / "empty")


def test_bad_descriptions_are_named(tmp_path):
    model = build_model("vit_tiny+qformer_tiny")
    model.save_pretrained(tmp_path / "ckpt", format="blip2kit")
    path = tmp_path / "ckpt" / "blip2kit.json"
    description = json.loads(path.read_text())
    description["composition"]["bridge"]["card"] = "qformer_from_elsewhere"
    path.write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="qformer_from_elsewhere.*Install the plugin"):
        from_pretrained(tmp_path / "ckpt")
    path.write_text('{"format": "blip2kit", ')
    with pytest.raises(CheckpointError, match="blip2kit.json' is not valid JSON"):
        from_pretrained(tmp_path / "ckpt")


def test_weights_that_do_not_fit_the_description_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = build_model("vit_tiny+qformer_tiny")
    model.save_pretrained(tmp_path / "ckpt", format="blip2kit")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = read_state(weights)
    state.pop("bridge.query_tokens")
    state["bridge.stray"] = torch.zeros(2)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys: bridge\.query_tokens.*unexpected keys: bridge\.stray"):
        from_pretrained(tmp_path / "ckpt")
    state = read_state(weights)
    state.pop("bridge.stray")
    state["bridge.query_tokens"] = torch.full_like(model.bridge.query_tokens, float("nan"))
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in bridge\.query_tokens"):
        from_pretrained(tmp_path / "ckpt")


# -- saves that fail midway --------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fmt", ["blip2kit", "hf", "lavis"])
@pytest.mark.parametrize("step", ["tensors", "description", "export"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fmt, step):
    import blip2kit.core.checkpoints as checkpoints
    import blip2kit.core.checkpoints.native as native

    model = build_model("vit_tiny+qformer_tiny")
    target = tmp_path / "ckpt"
    model.save_pretrained(target, format=fmt)
    before = sorted(path.name for path in target.iterdir())
    saved_queries = model.bridge.query_tokens.detach().clone()
    with torch.no_grad():
        model.bridge.query_tokens.add_(1.0)
    if step == "tensors":
        if fmt == "lavis":
            monkeypatch.setattr(checkpoints.torch, "save", _boom)
        else:
            monkeypatch.setattr("safetensors.torch.save_file", _boom)
    elif step == "description":
        monkeypatch.setattr(checkpoints, "describe", _boom, raising=False)
        monkeypatch.setattr(native, "describe", _boom)
    else:  # a plugin's export raising
        monkeypatch.setattr(type(model.bridge), "export_external_state", _boom)
        monkeypatch.setattr(type(model.bridge), "settings", _boom)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target, format=fmt)
    monkeypatch.undo()
    assert sorted(path.name for path in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    again = from_pretrained(target)
    assert torch.equal(again.bridge.query_tokens, saved_queries)
