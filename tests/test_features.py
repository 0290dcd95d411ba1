"""The feature API (embed_images, embed_texts, match) against transformers'
Blip2ForImageTextRetrieval on the same weights, and retrieval_scores against a hand computation."""

from __future__ import annotations

import pytest
import torch

from blip2kit.core import build_model, from_pretrained
from blip2kit.core.errors import InputError
from blip2kit.core.evaluation import retrieval_scores
from blip2kit.plugins.bridges.qformer import load_tokenizer
from random_weights import fill_random

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "ball", "sits", "runs"]
TEXTS = ["a cat on the mat", "the red ball", "a dog runs", "the cat sits on a mat", "red dog",
         "a ball", "the mat", "dog sits on the red ball"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from threads; on a loaded 2-core machine two spinning OpenMP
    # threads make every op ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=60, max_position_embeddings=64, use_qformer_text_input=True),
        num_query_tokens=8,
        image_text_hidden_size=16,
    )
    hf = Blip2ForImageTextRetrieval(config).eval()
    fill_random(hf)
    directory = tmp_path_factory.mktemp("itm")
    hf.save_pretrained(directory / "hf")
    vocab = directory / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    ours = from_pretrained(directory / "hf")
    ours.bridge.tokenizer = load_tokenizer(vocab)
    return hf, ours


def test_features_itm_and_itc_equal_transformers(hf_and_ours) -> None:
    hf, ours = hf_and_ours
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 28, 28)
    texts = TEXTS[:3]
    ours.train()  # the API must compute in eval mode regardless, and restore the mode
    images = ours.embed_images(pixels)
    text = ours.embed_texts(texts)
    scores = ours.match(pixels, texts)
    assert ours.bridge.training

    ids, mask = text.input_ids, text.attention_mask
    with torch.no_grad():
        itc = hf(pixels, ids, mask, use_image_text_matching_head=False)
        itm = hf(pixels, ids, mask, use_image_text_matching_head=True)
        vision = hf.vision_model(pixels).last_hidden_state
        query_output = hf.qformer(
            query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=vision
        ).last_hidden_state

    assert images.features.shape == (3, 8, 16) and text.features.shape == (3, 16)
    assert torch.allclose(images.features.norm(dim=-1), torch.ones(3, 8), atol=1e-5)

    def close(got: torch.Tensor, expected: torch.Tensor) -> None:
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5

    close(images.features, itc.image_embeds)
    close(images.query_output, query_output)
    close(text.features, itc.text_embeds)
    close(text.token_output, itc.text_model_output.last_hidden_state)
    close(scores.itc_similarity, itc.logits_per_image.diagonal())
    close(scores.itm_logit, itm.logits_per_image[:, 1])
    close(scores.itm_probability, itm.logits_per_image.softmax(dim=-1)[:, 1])


def test_retrieval_scores_equal_a_direct_computation(hf_and_ours) -> None:
    _, ours = hf_and_ours
    torch.manual_seed(4)
    pixels = torch.randn(5, 3, 28, 28)
    k_test = 3
    scores_i2t, scores_t2i = retrieval_scores(
        ours, [pixels[:2], pixels[2:]], TEXTS, k_test=k_test, batch_size=4, text_max_length=12,
        show_progress=False,
    )
    assert scores_i2t.shape == (5, 8) and scores_t2i.shape == (8, 5)

    # By hand, one pair at a time through the public feature API.
    image_features = [ours.embed_images(pixels[i : i + 1]).features[0] for i in range(5)]  # (Q, D)
    text_features = [ours.embed_texts([t], max_length=12).features[0] for t in TEXTS]  # (D,)
    itc = [[max(float(q @ t) for q in image) for t in text_features] for image in image_features]

    def itm_logit(image: int, text: int) -> float:
        return float(ours.match(pixels[image : image + 1], [TEXTS[text]], max_length=12).itm_logit[0])

    expected_i2t = torch.full((5, 8), -100.0)
    for image in range(5):
        for text in sorted(range(8), key=lambda t: -itc[image][t])[:k_test]:
            expected_i2t[image, text] = itc[image][text] + itm_logit(image, text)
    expected_t2i = torch.full((8, 5), -100.0)
    for text in range(8):
        for image in sorted(range(5), key=lambda i: -itc[i][text])[:k_test]:
            expected_t2i[text, image] = itc[image][text] + itm_logit(image, text)
    assert torch.allclose(scores_i2t, expected_i2t, atol=1e-5)
    assert torch.allclose(scores_t2i, expected_t2i, atol=1e-5)
    assert (scores_i2t == -100).sum() == 5 * (8 - k_test)


def test_stage2_and_bad_inputs_get_clear_errors(hf_and_ours) -> None:
    _, ours = hf_and_ours
    stage2 = build_model("vit_tiny+qformer_tiny+opt_tiny")
    with pytest.raises(RuntimeError, match="stage-1 composition"):
        stage2.embed_images(torch.randn(1, 3, 28, 28))
    with pytest.raises(RuntimeError, match="stage-1 composition"):
        stage2.embed_texts(["a cat"])
    # The same checks as every Blip2 method (blip2kit.core.validation), naming the fix.
    with pytest.raises(InputError, match=r"without a batch dimension.*pixels\.unsqueeze\(0\)"):
        ours.embed_images(torch.randn(3, 28, 28))
    with pytest.raises(InputError, match=r"dtype torch\.uint8 \(raw 0-255 values\?\).*model\.vision\.transform\(\)"):
        ours.match(torch.zeros(1, 3, 28, 28, dtype=torch.uint8), ["a cat"])
    with pytest.raises(InputError, match="are 32x32 but the vision encoder reads 28x28"):
        ours.embed_images(torch.randn(1, 3, 32, 32))
    with pytest.raises(InputError, match="look like raw 0-255"):
        ours.embed_images(torch.full((1, 3, 28, 28), 200.0))
    with pytest.raises(ValueError, match="2 texts for 1 images"):
        ours.match(torch.randn(1, 3, 28, 28), ["a cat", "a dog"])
    with pytest.raises(ValueError, match="no images"):
        retrieval_scores(ours, [], TEXTS, show_progress=False)


def test_ranks_each_rerank_their_block_and_sum_to_the_single_process_scores(hf_and_ours, monkeypatch) -> None:
    import blip2kit.core.evaluation.retrieval_scoring as scoring

    _, ours = hf_and_ours
    torch.manual_seed(5)
    pixels = torch.randn(5, 3, 28, 28)

    def scores() -> tuple[torch.Tensor, torch.Tensor]:
        return retrieval_scores(ours, [pixels], TEXTS, k_test=2, batch_size=8, text_max_length=12,
                                show_progress=False, split_across_ranks=True)

    single_i2t, single_t2i = scores()
    summed: list[torch.Tensor] = []
    monkeypatch.setattr(scoring, "_sum_across_ranks", lambda tensor: summed.append(tensor) or tensor)
    monkeypatch.setattr(scoring, "world_info", lambda: (1, 2))
    # Without split_across_ranks one rank computes everything and joins no collective.
    alone_i2t, _ = retrieval_scores(ours, [pixels], TEXTS, k_test=2, batch_size=8, text_max_length=12,
                                    show_progress=False)
    assert summed == [] and torch.equal(alone_i2t, single_i2t)
    for rank in (0, 1):
        monkeypatch.setattr(scoring, "world_info", lambda rank=rank: (rank, 2))
        scores()
    i2t_rank0, t2i_rank0, i2t_rank1, t2i_rank1 = summed
    assert (i2t_rank0[3:] == 0).all() and (i2t_rank1[:3] == 0).all()  # images 0-2 | 3-4
    assert (t2i_rank0[4:] == 0).all() and (t2i_rank1[:4] == 0).all()  # texts 0-3 | 4-7
    assert torch.allclose(i2t_rank0 + i2t_rank1, single_i2t, atol=1e-6)
    assert torch.allclose(t2i_rank0 + t2i_rank1, single_t2i, atol=1e-6)
