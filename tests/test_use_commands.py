"""``blip2kit caption / ask / retrieve / embed`` and retrieval ``eval``: --json output, one-line
errors, and a stage-1 tiny model registered as a named model (random weights)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blip2kit.core.cli import main
from blip2kit.core.commands.use import split_inputs
from blip2kit.plugins.language.testing import make_opt_tokenizer
from blip2kit.registry import ModelCard
from eval_fixtures import write_image, write_karpathy

WORDS = ["a", "red", "circle", "on", "blue", "square", "two", "cats", "couch", "man", "horse", "beach",
         "green", "triangle", "the", "dog", "."]


@pytest.fixture
def tiny_models(registry, tmp_path):
    """'tiny-retrieval' (vit_tiny+qformer_tiny) and 'tiny-captioner' (+opt_tiny), random weights."""
    vocab = tmp_path / "bert"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bridge = {"tokenizer": str(vocab), "vocab_size": len(WORDS) + 6}
    registry.add_model(ModelCard(name="tiny-retrieval", composition="vit_tiny+qformer_tiny",
                                 overrides={"bridge": bridge}))
    make_opt_tokenizer(tmp_path / "opt")
    registry.add_model(ModelCard(name="tiny-captioner", composition="vit_tiny+qformer_tiny+opt_tiny",
                                 overrides={"language": {"tokenizer": str(tmp_path / "opt"), "prompt": "a photo of"}}))
    return registry


@pytest.fixture
def images(tmp_path):
    return [write_image(tmp_path / "pictures" / f"{name}.png", seed) for seed, name in enumerate(("cat", "dog", "sun"))]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "random weights" in captured.err  # a composition without weights says so
    return json.loads(captured.out)


FAST = ["--num-beams", "1", "--max-len", "3", "--device", "cpu", "--json"]


def test_caption_and_ask_json(tiny_models, images, capsys):
    records = _run(["caption", *map(str, images[:2]), "--model", "tiny-captioner", "--batch-size", "2", *FAST], capsys)
    assert [r["image"] for r in records] == [str(images[0]), str(images[1])]
    assert all(isinstance(r["caption"], str) for r in records)

    answer = _run(["ask", str(images[0]), "What color is it?", "--model", "tiny-captioner", *FAST], capsys)
    assert answer["image"] == str(images[0]) and answer["question"] == "What color is it?"
    assert isinstance(answer["answer"], str)


def test_missing_and_unreadable_images_are_one_line_errors(tiny_models, images, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.jpg"), "--model", "tiny-captioner"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"blip2kit caption: error: image {str(tmp_path / 'nope.jpg')!r} does not exist"

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert main(["ask", str(broken), "why?", "--model", "tiny-captioner"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("blip2kit ask: error: image") and "broken.jpg" in error and "\n" not in error

    assert main(["retrieve", "--images", str(tmp_path / "none"), "--texts", "t.txt", "--model", "tiny-retrieval"]) == 2
    assert "images folder" in capsys.readouterr().err


def test_embed_writes_normalised_features(tiny_models, images, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    summary = _run(["embed", str(images[0]), "a red circle", str(images[1]), "--out", str(out),
                    "--model", "tiny-retrieval", "--device", "cpu", "--json"], capsys)
    assert summary["images"] == [str(images[0]), str(images[1])] and summary["texts"] == ["a red circle"]
    tensors = load_file(str(out))
    assert summary["tensors"] == {name: list(value.shape) for name, value in tensors.items()}
    width = tensors["image_features"].shape[-1]  # the bridge's ITC width (256 full size)
    assert tensors["image_features"].shape[0] == 2 and tensors["text_features"].shape == (1, width)
    assert tensors["image_query_output"].shape[:2] == tensors["image_features"].shape[:2]
    norms = torch.cat([tensors["image_features"].flatten(0, 1), tensors["text_features"]]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # Token level (LAVIS' text_embeds): one row per token, [CLS] a red circle [SEP] are real, the rest padding.
    hidden = tensors["image_query_output"].shape[-1]
    assert tensors["text_token_output"].shape[0] == 1 and tensors["text_token_output"].shape[2] == hidden
    assert tensors["text_attention_mask"].dtype == torch.int64
    assert tensors["text_attention_mask"].shape == tensors["text_token_output"].shape[:2]
    assert tensors["text_attention_mask"].sum().item() == 5


def test_embed_token_outputs_of_batches_are_padded_to_the_longest():
    from blip2kit.core.commands.use import _cat_padded

    short, long = torch.ones(1, 2, 4), torch.full((2, 3, 4), 2.0)
    joined = _cat_padded([short, long])
    assert joined.shape == (3, 3, 4)
    assert torch.equal(joined[0, :2], short[0]) and torch.equal(joined[0, 2], torch.zeros(4))
    assert torch.equal(joined[1:], long)
    masks = _cat_padded([torch.ones(1, 2, dtype=torch.int64), torch.ones(1, 3, dtype=torch.int64)])
    assert masks.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_embed_inputs_are_images_only_when_they_exist(images, tmp_path):
    assert split_inputs([str(images[0]), "a dog", "dog.jpg is good"]) == ([images[0]], ["a dog", "dog.jpg is good"])
    with pytest.raises(FileNotFoundError, match="image 'missing.jpg' does not exist"):
        split_inputs(["missing.jpg"])


def test_retrieve_json_ranks_every_text(tiny_models, images, tmp_path, capsys):
    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle\n\ntwo cats on a couch\n")
    results = _run(["retrieve", "--images", str(images[0].parent), "--texts", str(texts), "--top", "2",
                    "--k-test", "2", "--model", "tiny-retrieval", "--device", "cpu", "--json"], capsys)
    assert [r["text"] for r in results] == ["a red circle", "two cats on a couch"]
    for result in results:
        assert len(result["images"]) == 2
        assert {hit["image"] for hit in result["images"]} <= {str(path) for path in images}
        scores = [hit["score"] for hit in result["images"]]
        assert scores == sorted(scores, reverse=True)


def test_retrieve_ranks_texts_per_image_as_computed_by_hand(tiny_models, images, tmp_path, capsys, monkeypatch):
    import blip2kit.core.evaluation as evaluation

    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle\ntwo cats\na dog\n")
    # Images are read in name order: cat, dog, sun. -100 is what re-ranking gives non-candidates;
    # the scores are exact in float32, so the JSON holds them as written.
    scores_i2t = torch.tensor([[0.125, 2.0, -100.0], [1.5, -100.0, 3.0], [0.75, 0.25, 0.875]])  # [image, text]
    scores_t2i = torch.tensor([[0.25, -1.0, 0.75], [2.5, 0.5, -100.0], [-100.0, 1.25, 0.625]])  # [text, image]
    calls = []

    def fake_scores(model, image_batches, texts, *, k_test, batch_size):
        calls.append((sum(len(batch) for batch in image_batches), list(texts), k_test))
        return scores_i2t, scores_t2i

    monkeypatch.setattr(evaluation, "retrieval_scores", fake_scores)
    cat, dog, sun = (str(path) for path in images)
    argv = ["retrieve", "--images", str(images[0].parent), "--texts", str(texts), "--top", "2", "--k-test", "3",
            "--model", "tiny-retrieval", "--device", "cpu", "--json"]
    per_image = _run([*argv, "--direction", "image-to-text"], capsys)
    assert calls == [(3, ["a red circle", "two cats", "a dog"], 3)]
    assert per_image == [
        {"image": cat, "texts": [{"text": "two cats", "score": 2.0}, {"text": "a red circle", "score": 0.125}]},
        {"image": dog, "texts": [{"text": "a dog", "score": 3.0}, {"text": "a red circle", "score": 1.5}]},
        {"image": sun, "texts": [{"text": "a dog", "score": 0.875}, {"text": "a red circle", "score": 0.75}]},
    ]
    both = _run([*argv, "--direction", "both"], capsys)
    assert both["image_to_text"] == per_image
    assert [[hit["image"] for hit in record["images"]] for record in both["text_to_image"]] == [
        [sun, cat], [cat, dog], [dog, sun]]
    assert both["text_to_image"] == _run(argv, capsys)  # the default direction, as before

    assert main([*argv[:-1], "--direction", "image-to-text", "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        cat, "  1. two cats  2.0000", dog, "  1. a dog  3.0000", sun, "  1. a dog  0.8750"]


def test_retrieve_both_directions_score_each_pair_alike(tiny_models, images, tmp_path, capsys):
    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle\ntwo cats on a couch\nthe dog\n")
    # With every candidate re-ranked, a pair's score (ITC + ITM) is the same seen from either side.
    results = _run(["retrieve", "--images", str(images[0].parent), "--texts", str(texts), "--top", "3",
                    "--k-test", "3", "--direction", "both", "--model", "tiny-retrieval", "--device", "cpu",
                    "--json"], capsys)
    from_texts = {(hit["image"], r["text"]): hit["score"] for r in results["text_to_image"] for hit in r["images"]}
    from_images = {(r["image"], hit["text"]): hit["score"] for r in results["image_to_text"] for hit in r["texts"]}
    assert from_texts.keys() == from_images.keys() and len(from_texts) == 9
    for pair, score in from_texts.items():
        assert from_images[pair] == pytest.approx(score, abs=1e-4)
    for record in results["image_to_text"]:
        scores = [hit["score"] for hit in record["texts"]]
        assert scores == sorted(scores, reverse=True)


def test_retrieval_eval_writes_ranks_that_give_the_recalls(tiny_models, tmp_path, capsys):
    karpathy = write_karpathy(tmp_path, tmp_path / "coco")
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000139.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    code = main(["eval", "--task", "coco_retrieval", "--model", "tiny-retrieval", "--annotations", str(karpathy),
                 "--images", str(tmp_path / "coco"), "--out", str(out), "--k-test", "1", "--device", "cpu",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "metrics.json").read_text())
    ranks = json.loads((out / "ranks.json").read_text())
    assert document["total"] == 3 and document["evaluated"] == 2 and document["texts"] == 4
    assert [item["id"] for item in document["skipped"]["items"]] == [139]
    assert [r["image_id"] for r in ranks["image_to_text"]] == [42, 73]
    assert [r["text_index"] for r in ranks["text_to_image"]] == [0, 1, 2, 3]
    image_ranks = [r["rank"] for r in ranks["image_to_text"]]
    text_ranks = [r["rank"] for r in ranks["text_to_image"]]
    metrics = document["metrics"]
    for k in (1, 5, 10):
        assert metrics[f"txt_r{k}"] == pytest.approx(100 * sum(r <= k for r in image_ranks) / 2)
        assert metrics[f"img_r{k}"] == pytest.approx(100 * sum(r <= k for r in text_ranks) / 4)
    assert document["settings"]["k_test"] == 1
