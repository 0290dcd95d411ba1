"""Components own their checkpoint formats: a third-party Llama LLM plugin loads, saves and reloads
through HF and LAVIS with no change to blip2kit; HF import is faithful to transformers (defaults for
omitted fields, non-default activations) and refuses settings blip2kit does not implement."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import blip2kit.registry.registry as registry_module
from blip2kit.core import from_pretrained
from blip2kit.core.checkpoints import CheckpointError, composition_of_lavis_state, read_state
from blip2kit.registry import load_registry
from random_weights import fill_random

QUERIES = 4
VOCAB = 96
IMAGE_TOKEN = VOCAB - 1

# Written only against blip2kit's public interfaces and transformers, as another package would be.
LLAMA_PLUGIN = '''
"""A Llama language model from outside blip2kit."""
import torch
from blip2kit.core import ConvertedState, LanguageModel
from blip2kit.registry import CheckpointFormats, ComponentCard, hookimpl

_BOOKKEEPING = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                "model_type", "output_attentions", "output_hidden_states", "return_dict")


class LlamaLM(LanguageModel):
    is_encoder_decoder = False
    lavis_projection_prefix = "llm_proj."
    tokenizer_files = ("tokenizer.json",)
    prefixes = {"hf": "language_model.", "lavis": "llm_model."}

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.model = LlamaForCausalLM(LlamaConfig(**config["llama"]))
        self.prompt = config["prompt"]
        self.tokenizer_source = config["tokenizer"]

    @property
    def hidden_size(self):
        return self.model.config.hidden_size

    @property
    def vocab_size(self):
        return self.model.config.vocab_size

    @property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_source)

    def settings(self):
        return {**super().settings(), "prompt": self.prompt}

    def load_tokenizer(self, directory):
        self.tokenizer_source = str(directory)

    def loss(self, prefix_embeds, prefix_mask, input_text, target_text=None):
        raise NotImplementedError("not needed for checkpoint tests")

    def generate(self, prefix_embeds, prefix_mask, prompts, options):
        raise NotImplementedError("not needed for checkpoint tests")

    def hf_config(self):
        config = self.model.config.to_dict()
        for key in _BOOKKEEPING[:-4]:
            config.pop(key, None)
        config["model_type"] = "llama"
        return config

    def convert_external_state(self, state, source):
        prefix, converted = self.prefixes[source], ConvertedState()
        for key, value in state.items():
            if key.startswith(prefix):
                converted.state["model." + key[len(prefix):]] = value
                converted.consumed.add(key)
        return converted

    def export_external_state(self, target):
        return {self.prefixes[target] + key[len("model."):]: value
                for key, value in self.state_dict().items()}


def build(config, device=None):
    return LlamaLM(config)


def read_text_config(text_config, blip2_config):
    from transformers import LlamaConfig

    full = LlamaConfig.from_dict(dict(text_config)).to_dict()
    return "tiny_llama", {"llama": {k: v for k, v in full.items() if k not in _BOOKKEEPING}}


class Plugin:
    @hookimpl
    def blip2kit_register(self, registry):
        registry.add_language_model(ComponentCard(
            name="tiny_llama", kind="language", factory="acme_llama:build", width=48,
            config={"llama": {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96,
                              "num_hidden_layers": 2, "num_attention_heads": 4},
                    "prompt": "", "tokenizer": None},
            formats=CheckpointFormats(hf_model_types=("llama",), lavis_projection_prefix="llm_proj.",
                                      hf_config_reader="acme_llama:read_text_config"),
        ))
'''


@pytest.fixture
def llama_registry(tmp_path, monkeypatch):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "acme_llama.py").write_text(textwrap.dedent(LLAMA_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    import acme_llama

    registry = load_registry(extra_plugins=[("acme_llama", acme_llama.Plugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    yield registry
    import sys

    sys.modules.pop("acme_llama", None)


def _save_hf_blip2(directory, *, vision=None, qformer=None, text=None):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 28, "patch_size": 14, **(vision or {})},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 64, **(qformer or {})},
        text_config=text, num_query_tokens=QUERIES, image_token_index=IMAGE_TOKEN,
    )
    hf = Blip2ForConditionalGeneration(config)
    fill_random(hf)
    hf.eval()
    hf.save_pretrained(directory)
    return hf


def _logits(ours, hf, decoder=False):
    """LM logits of the text positions: HF scatters the queries into image tokens, blip2kit prepends."""
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (2, 5))
    kwargs = {"decoder_input_ids": torch.tensor([[0, 4, 5]] * 2)} if decoder else {}
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=torch.cat([torch.full((2, QUERIES), IMAGE_TOKEN), ids], 1),
                    **kwargs).logits
        prefix, _ = ours.soft_prompt(pixels)
        embeds = torch.cat([prefix, ours.language.model.get_input_embeddings()(ids)], dim=1)
        mine = ours.language.model(inputs_embeds=embeds, **kwargs).logits
    if not decoder:
        theirs, mine = theirs[:, QUERIES:], mine[:, QUERIES:]
    return mine, theirs


LLAMA_TEXT = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5}


@pytest.mark.slow
def test_third_party_llama_loads_saves_and_reloads(tmp_path, llama_registry):
    from transformers import Blip2ForConditionalGeneration

    hf = _save_hf_blip2(tmp_path / "hf", text=LLAMA_TEXT)
    ours = from_pretrained(tmp_path / "hf").eval()
    assert ours.name == "vit_g+qformer+tiny_llama"
    assert ours.language.model.config.num_key_value_heads == 2  # from the file, not the card
    mine, theirs = _logits(ours, hf)
    assert (mine - theirs).abs().max().item() <= 1e-4

    ours.language.prompt = "a photo of"
    ours.save_pretrained(tmp_path / "export", format="hf")
    again_hf, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    mine, theirs = _logits(ours, again_hf.eval())
    assert (mine - theirs).abs().max().item() <= 1e-4
    reloaded = from_pretrained(tmp_path / "export")
    assert reloaded.language.prompt == "a photo of"
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reloaded.state_dict().values()))

    ours.save_pretrained(tmp_path / "lavis", format="lavis")
    state = read_state(tmp_path / "lavis" / "checkpoint.pth")
    assert "llm_proj.weight" in state and not any(key.startswith("llm_model.") for key in state)
    assert composition_of_lavis_state(state).endswith("+qformer+tiny_llama")
    with pytest.warns(UserWarning, match="frozen vision and language"):
        from_lavis = from_pretrained(tmp_path / "lavis")
    assert from_lavis.language.prompt == "a photo of"
    assert torch.equal(from_lavis.projection.weight, ours.projection.weight)
    assert torch.equal(from_lavis.bridge.query_tokens, ours.bridge.query_tokens)

    ours.save_pretrained(tmp_path / "native", format="blip2kit")
    native = from_pretrained(tmp_path / "native")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), native.state_dict().values()))


def test_unreadable_text_config_names_the_model_type(tmp_path):
    _save_hf_blip2(tmp_path / "hf", text=LLAMA_TEXT)  # no Llama plugin registered here
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*hf_model_types=\('llama',\)"):
        from_pretrained(tmp_path / "hf")


def test_omitted_fields_and_activations_follow_transformers(tmp_path):
    # OPT omits num_attention_heads (OPTConfig: 12), the towers use non-default activations.
    text = {"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 48, "num_hidden_layers": 2,
            "ffn_dim": 96, "max_position_embeddings": 64, "word_embed_proj_dim": 48}
    hf = _save_hf_blip2(tmp_path / "opt", vision={"hidden_act": "quick_gelu"},
                        qformer={"hidden_act": "gelu_new"}, text=text)
    ours = from_pretrained(tmp_path / "opt").eval()
    assert ours.language.model.config.num_attention_heads == 12
    assert ours.vision.hidden_act == "quick_gelu" and ours.bridge.config.hidden_act == "gelu_new"
    mine, theirs = _logits(ours, hf)
    assert (mine - theirs).abs().max().item() <= 1e-4
    ours.save_pretrained(tmp_path / "export", format="hf")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["vision_config"]["hidden_act"] == "quick_gelu"
    assert written["qformer_config"]["hidden_act"] == "gelu_new"


@pytest.mark.slow
def test_t5_omitted_fields_follow_transformers(tmp_path):
    # T5 omits relative_attention_max_distance (T5Config: 128; the tiny card says 32) and
    # dense_act_fn (T5Config: relu for a plain FFN); the head is untied.
    text = {"model_type": "t5", "vocab_size": VOCAB, "d_model": 48, "d_kv": 12, "d_ff": 96,
            "num_layers": 2, "num_heads": 4, "tie_word_embeddings": False, "decoder_start_token_id": 0}
    hf = _save_hf_blip2(tmp_path / "t5", text=text)
    ours = from_pretrained(tmp_path / "t5").eval()
    config = ours.language.model.config
    assert config.relative_attention_max_distance == 128 and config.dense_act_fn == "relu"
    assert ours.language.model.lm_head.weight is not ours.language.model.shared.weight
    mine, theirs = _logits(ours, hf, decoder=True)
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sub_config, setting", [
    ({"vision": {"qkv_bias": False}}, "vision_config.qkv_bias=False"),
    ({"vision": {"hidden_act": "mish"}}, "vision_config.hidden_act 'mish'"),
    ({"qformer": {"hidden_act": "mish"}}, "qformer_config.hidden_act 'mish'"),
])
def test_unimplemented_settings_are_refused_by_name(tmp_path, sub_config, setting):
    directory = tmp_path / "hf"
    directory.mkdir()
    config = {"architectures": ["Blip2ForConditionalGeneration"], "num_query_tokens": QUERIES,
              "vision_config": {"hidden_size": 32, **sub_config.get("vision", {})},
              "qformer_config": {"hidden_size": 32, **sub_config.get("qformer", {})},
              "text_config": {"model_type": "opt", "hidden_size": 48}}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json.*{setting}".replace("(", r"\(").replace(")", r"\)")):
        from_pretrained(directory)


@pytest.mark.parametrize("contents, message", [
    ("", "is empty"),
    ('{"architectures": [', "is not valid JSON"),
    ("[1, 2]", "not a Blip2Config object"),
])
def test_broken_config_json_is_named(tmp_path, contents, message):
    (tmp_path / "config.json").write_text(contents)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path)


def test_zero_byte_pth_and_missing_relative_path(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth' is empty \(0 bytes\)"):
        from_pretrained(tmp_path / "checkpoint.pth")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint path 'runs/blip2' does not exist"):
        from_pretrained("runs/blip2")
