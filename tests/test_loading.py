"""Loading at the memory of the final model: ``from_pretrained`` builds with empty (meta) parameters
and reads each tensor into its final dtype, and must give exactly the model that today's eager path
gives (build everything with random fp32 weights, copy the whole file in, then cast).

The reference below is that eager path written out with the public pieces. Every parameter and
buffer (non-persistent ones included) must be equal in value and dtype, for HF, LAVIS and blip2kit
checkpoints, in fp32 and bf16; ties (OPT's head) must survive; a third-party component that cannot
be built on meta falls back; and device_map places the model on CPU-only machines.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from blip2kit.core import build_model, from_pretrained
from blip2kit.core.checkpoints import LAVIS_FILE, composition_of_lavis_state, load_state, read_state
from blip2kit.core.checkpoints.hf import model_from_hf_config, read_hf_config
from blip2kit.core.checkpoints.native import (
    WEIGHTS_FILE,
    load_blip2kit_state,
    read_description,
    rebuild,
    restore_dtypes,
)
from blip2kit.core.errors import DeviceError
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer
from blip2kit.registry import ComponentCard
from doubles import PatchVision


def _perturbed(model):
    """Values unlike any initialisation (LayerNorms not one, biases not zero)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module", params=["opt", "t5"])
def saved(request, tmp_path_factory):
    """A tiny stage-2 model with random values, saved in the three formats (+ its towers' files)."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    language, maker = ("opt_tiny", make_opt_tokenizer) if request.param == "opt" else ("flant5_tiny", make_t5_tokenizer)
    maker(root / "tokenizer")
    model = _perturbed(build_model(f"vit_tiny+qformer_tiny+{language}",
                                   language={"tokenizer": str(root / "tokenizer")}))
    _ = model.language.tokenizer
    # The frozen towers a LAVIS file leaves out, where their `pretrained` settings find them (as a
    # released model's settings name eva_vit_g.pth and facebook/opt-2.7b).
    torch.save(model.vision.export_external_state("lavis"), root / "vision.pth")
    model.language.model.save_pretrained(root / "llm")
    model.vision.build_config = {**model.vision.build_config, "pretrained": str(root / "vision.pth")}
    model.language.build_config = {**model.language.build_config, "pretrained": str(root / "llm")}
    for fmt in ("hf", "lavis", "blip2kit"):
        model.save_pretrained(root / fmt, format=fmt)
    shutil.copytree(root / "hf", root / "hf_plain")
    (root / "hf_plain" / "blip2kit.json").unlink()  # a transformers-made directory: config.json only
    return root, language, model


def _eager(fmt, root, language, precision):
    """Today's path: random fp32 model built whole, the whole file read and copied in, then cast."""
    if fmt == "hf_plain":
        directory = root / "hf_plain"
        model = model_from_hf_config(read_hf_config(directory), directory)
        load_state(model, read_state(directory), "hf")
    elif fmt == "lavis_plain":
        state = read_state(root / "lavis" / LAVIS_FILE)
        model = build_model(composition_of_lavis_state(state), **_tower_settings(root))
        with pytest.warns(UserWarning, match="LAVIS saves only trainable keys"):
            load_state(model, state, "lavis")
    else:
        description = read_description(root / fmt)
        model = rebuild(description)
        if fmt == "blip2kit":
            state = read_state(root / fmt / WEIGHTS_FILE)
            for alias, kept in description["tied_aliases"].items():
                state[alias] = state[kept]
            load_blip2kit_state(model, state, description, where=str(root / fmt))
        else:
            source = root / fmt if fmt == "hf" else root / fmt / LAVIS_FILE
            load_state(model, read_state(source), fmt)
        restore_dtypes(model, description)
    model.set_precision(precision)
    return model


def _tower_settings(root):
    """Overrides for the LAVIS file: the settings of the saved model's cards (the cards are picked
    from tensor widths, and the first card that wide may be another one: shapes_vit, the full
    qformer), with the frozen towers' `pretrained` sources."""
    from blip2kit.registry import get_registry

    registry = get_registry()
    chosen = composition_of_lavis_state(read_state(root / "lavis" / LAVIS_FILE)).split("+")
    saved = read_description(root / "lavis")["composition"]
    overrides = {}
    for slot, card_name in zip(("vision", "bridge", "language"), chosen):
        card = registry.get(slot, card_name)
        overrides[slot] = {key: value for key, value in saved[slot]["settings"].items() if key in card.config}
    overrides["vision"]["pretrained"] = str(root / "vision.pth")
    overrides["language"].update(pretrained=str(root / "llm"), tokenizer=str(root / "tokenizer"))
    return overrides


def _streamed(fmt, root, precision):
    if fmt == "hf_plain":
        return from_pretrained(root / "hf_plain", precision=precision)
    if fmt == "lavis_plain":
        with pytest.warns(UserWarning, match="LAVIS saves only trainable keys"):
            return from_pretrained(root / "lavis" / LAVIS_FILE, precision=precision, **_tower_settings(root))
    return from_pretrained(root / fmt, precision=precision)


def assert_same_tensors(expected, actual):
    """Every parameter and buffer (non-persistent included): same names, dtypes and values."""
    named = lambda model: {**dict(model.named_parameters(remove_duplicate=False)),  # noqa: E731
                           **dict(model.named_buffers(remove_duplicate=False))}
    want, got = named(expected), named(actual)
    assert sorted(want) == sorted(got)
    for name, tensor in want.items():
        assert not got[name].is_meta, f"{name} left on meta"
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["hf_plain", "hf", "lavis_plain", "lavis", "blip2kit"])
def test_streamed_load_equals_the_eager_path(saved, fmt, precision):
    root, language, _ = saved
    expected = _eager(fmt, root, language, precision)
    actual = _streamed(fmt, root, precision)
    assert_same_tensors(expected, actual)
    assert actual.precision == expected.precision
    lm = actual.language.model
    if language == "opt_tiny":  # the tie is one parameter, not two equal ones
        assert lm.lm_head.weight is lm.get_input_embeddings().weight
    else:  # Flan-T5's head is its own tensor, and wo stays fp32 with its full bits
        assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
        assert lm.encoder.embed_tokens.weight is lm.shared.weight
        wo = lm.encoder.block[0].layer[1].DenseReluDense.wo.weight
        assert wo.dtype == torch.float32
        source = read_state(root / "hf_plain")["language_model.encoder.block.0.layer.1.DenseReluDense.wo.weight"]
        assert torch.equal(wo, source)


def test_frozen_towers_are_never_made_as_random_fp32(saved, monkeypatch):
    """When the file is read, the towers hold no values yet (meta) and already have their final
    dtype: no random fp32 copy was ever made; each tensor is created once, from the file."""
    root, _, _ = saved
    import blip2kit.core.checkpoints.pretrained as pretrained

    seen = {}
    real_load_state = pretrained.load_state

    def spy(model, state, *args, **kwargs):
        for name, parameter in model.named_parameters():
            seen[name] = (parameter.is_meta, parameter.dtype)
        return real_load_state(model, state, *args, **kwargs)

    monkeypatch.setattr(pretrained, "load_state", spy)
    model = from_pretrained(root / "hf_plain", precision="bf16")
    towers = {name: state for name, state in seen.items() if name.startswith(("vision.", "language."))}
    assert towers and all(is_meta for is_meta, _ in towers.values())
    assert {dtype for _, dtype in towers.values()} <= {torch.bfloat16, torch.float32}  # T5's wo: fp32
    assert sum(dtype == torch.bfloat16 for _, dtype in towers.values()) > len(towers) // 2
    assert all(seen[name][0] for name in seen if name.startswith(("bridge.", "projection.")))
    assert not any(parameter.is_meta for parameter in model.parameters())


def test_a_part_the_file_leaves_short_is_built_as_before(tmp_path):
    """Stage 1 from HF: the file has no Q-Former LM head or temperature; the bridge is then built
    with its own initialisation (temp 0.07), the rest loaded."""
    torch.manual_seed(0)
    model = _perturbed(build_model("vit_tiny+qformer_tiny"))
    model.save_pretrained(tmp_path / "s1", format="hf")
    (tmp_path / "s1" / "blip2kit.json").unlink()
    again = from_pretrained(tmp_path / "s1")
    assert again.bridge.temp.item() == pytest.approx(0.07)
    assert torch.equal(again.bridge.query_tokens, model.bridge.query_tokens)
    assert torch.equal(again.vision.vit.pos_embed, model.vision.vit.pos_embed)
    assert not any(tensor.is_meta for tensor in again.state_dict().values())


class _NeedsValues(PatchVision):
    """A third-party encoder whose constructor computes with its weights (no meta build)."""

    def __init__(self, **config):
        super().__init__(**config)
        self.scale = float(self.patch_embed.weight.abs().mean().item())  # fails on meta


def test_a_component_that_cannot_be_built_on_meta_falls_back(registry, tmp_path):
    registry.add_vision_encoder(ComponentCard(
        name="needs_values", kind="vision", factory=lambda config, device=None: _NeedsValues(**config),
        config={"width": 32, "image_size": 32, "patch_size": 8}, width=32))
    model = _perturbed(build_model("needs_values+qformer_tiny"))
    model.save_pretrained(tmp_path / "ckpt", format="blip2kit")
    with pytest.warns(UserWarning, match="'needs_values' cannot be built with empty"):
        again = from_pretrained(tmp_path / "ckpt")
    assert_same_tensors(model, again)


def test_strict_errors_come_before_anything_is_read(saved, tmp_path):
    root, _, _ = saved
    from safetensors.torch import load_file, save_file

    from blip2kit.core.checkpoints import CheckpointError

    shutil.copytree(root / "hf_plain", tmp_path / "cut")
    state = load_file(str(tmp_path / "cut" / "model.safetensors"))
    state.pop(sorted(key for key in state if key.startswith("qformer."))[0])
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        from_pretrained(tmp_path / "cut")


# -- device_map -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"vision": "cpu", "bridge": "cpu",
                                                         "projection": "cpu", "language": "cpu"},
                                        {"": "cpu", "language.model": "cpu"}])
def test_device_map_on_cpu(saved, device_map):
    root, _, _ = saved
    model = from_pretrained(root / "hf_plain", device_map=device_map)
    reference = _eager("hf_plain", root, None, "fp32")
    assert_same_tensors(reference, model)
    assert all(tensor.device.type == "cpu" for tensor in model.state_dict().values())
    pixels = torch.randn(1, 3, 112, 112)
    reference.eval(), model.eval()
    assert torch.equal(model.soft_prompt(pixels)[0], reference.soft_prompt(pixels)[0])


@pytest.mark.parametrize("device_map, message", [
    ({"vison": "cpu"}, "names 'vison', which is not a module"),
    ({"vision": "tpu"}, r"device_map\['vision'\] = 'tpu' is not a device"),
    ({"vision": "cpu"}, "gives no device to"),
    ({"": "disk"}, "disk is not supported|offloading weights to disk is not supported"),
])
def test_device_map_errors_are_named(saved, device_map, message):
    root, _, _ = saved
    with pytest.raises(DeviceError, match=message):
        from_pretrained(root / "hf_plain", device_map=device_map)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("device_map", ["cuda:0", 0, {"": "cuda:0"}])
def test_device_map_gpu_without_gpu(saved, device_map):
    root, _, _ = saved
    with pytest.raises(DeviceError, match="asks for a CUDA GPU"):
        from_pretrained(root / "hf_plain", device_map=device_map)


def test_device_and_device_map_together_are_refused(saved):
    root, _, _ = saved
    with pytest.raises(ValueError, match="not both"):
        from_pretrained(root / "hf_plain", device="cpu", device_map="cpu")
