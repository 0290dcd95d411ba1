"""Evaluation readers on the public formats, LAVIS' recipes and their translation into decoding."""

from __future__ import annotations

import json

import pytest
import torch

from blip2kit.core import build_model
from blip2kit.core.evaluation.datasets import (
    DatasetFormatError,
    read_captions,
    read_gqa,
    read_retrieval,
    read_vqa,
)
from blip2kit.core.evaluation.recipes import generation_options, process_question, recipe
from blip2kit.core.evaluation.runner import PredictionLog
from blip2kit.plugins.language.testing import make_opt_tokenizer, make_t5_tokenizer
from eval_fixtures import QUESTIONS, write_coco_images, write_gqa, write_karpathy, write_nocaps, write_vqa


def test_vqa_reader_maps_questions_to_coco_files(tmp_path):
    images = write_coco_images(tmp_path / "images")
    questions, annotations = write_vqa(tmp_path)
    dataset = read_vqa(questions, annotations, images)
    assert [s.question_id for s in dataset.samples] == [q[1] for q in QUESTIONS]
    assert dataset.samples[0].image == images / "COCO_val2014_000000000042.jpg"
    assert dataset.samples[0].image.is_file()
    assert len(dataset.annotations) == len(QUESTIONS)


def test_vqa_reader_names_file_record_and_key(tmp_path):
    questions, annotations = write_vqa(tmp_path)
    document = json.loads(questions.read_text())
    del document["questions"][2]["image_id"]
    questions.write_text(json.dumps(document))
    with pytest.raises(DatasetFormatError, match=r"questions\.json: questions\[2\]: missing key 'image_id'"):
        read_vqa(questions, annotations, tmp_path)

    write_vqa(tmp_path)
    document = json.loads(annotations.read_text())
    document["annotations"][1]["answers"][3] = {"text": "red"}
    annotations.write_text(json.dumps(document))
    with pytest.raises(DatasetFormatError, match=r"annotations\[1\]\.answers\[3\]: missing key 'answer'"):
        read_vqa(questions, annotations, tmp_path)

    (tmp_path / "broken.json").write_text('{"questions": [')
    with pytest.raises(DatasetFormatError, match="broken.json: not valid JSON"):
        read_vqa(tmp_path / "broken.json", None, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_vqa(tmp_path / "missing.json", None, tmp_path)


def test_vqa_reader_refuses_annotations_of_another_split(tmp_path):
    questions, annotations = write_vqa(tmp_path)
    document = json.loads(annotations.read_text())
    document["annotations"] = document["annotations"][:-1]
    annotations.write_text(json.dumps(document))
    with pytest.raises(DatasetFormatError, match="no annotation for 1 question.*28500"):
        read_vqa(questions, annotations, tmp_path)


def test_gqa_reader(tmp_path):
    path = write_gqa(tmp_path, tmp_path / "images")
    dataset = read_gqa(path, tmp_path / "images")
    assert len(dataset.samples) == len(QUESTIONS)
    assert all(sample.image.is_file() for sample in dataset.samples)
    assert dataset.questions[0]["answer"] == "red" and dataset.questions[0]["question_id"] == "42000"
    assert dataset.questions[0]["types"]["structural"] == "verify"


def test_karpathy_captions_take_the_split(tmp_path):
    path = write_karpathy(tmp_path, tmp_path / "images")
    dataset = read_captions(path, tmp_path / "images", split="test")
    assert [s.image_id for s in dataset.samples] == [42, 73, 139]
    assert dataset.samples[0].image == tmp_path / "images" / "val2014" / "COCO_val2014_000000000042.jpg"
    assert dataset.references[73] == ["Two cats laying on a couch.", "two cats on a couch"]
    with pytest.raises(DatasetFormatError, match=r"no image in split 'val'.*\['test', 'train'\]"):
        read_captions(path, tmp_path / "images", split="val")


def test_nocaps_reader_keeps_domains(tmp_path):
    path = write_nocaps(tmp_path, tmp_path / "images")
    dataset = read_captions(path, tmp_path / "images")
    assert [s.image_id for s in dataset.samples] == [0, 1, 2, 3]
    assert dataset.domains == {0: "in-domain", 1: "near-domain", 2: "out-domain", 3: "near-domain"}
    assert len(dataset.references[2]) == 2
    document = json.loads(path.read_text())
    document["annotations"][3]["image_id"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetFormatError, match=r"annotations\[3\]: image_id 99 is not among"):
        read_captions(path, tmp_path / "images")


def test_retrieval_reader_karpathy_and_lavis_layouts(tmp_path):
    path = write_karpathy(tmp_path, tmp_path / "images")
    dataset = read_retrieval(path, tmp_path / "images")
    assert dataset.image_ids == [42, 73, 139]
    assert dataset.img2txt == [[0, 1], [2, 3], [4, 5]]
    assert dataset.txt2img == [0, 0, 1, 1, 2, 2]
    assert dataset.texts[2] == "Two cats laying on a couch."

    lavis = [{"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["a", "b"]},
             {"image": "val2014/COCO_val2014_000000000073.jpg", "caption": ["c"]}]
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(lavis))
    dataset = read_retrieval(tmp_path / "coco_karpathy_test.json", tmp_path / "images")
    assert dataset.img2txt == [[0, 1], [2]] and dataset.txt2img == [0, 0, 1]
    lavis[1]["caption"] = "c"
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(lavis))
    with pytest.raises(DatasetFormatError, match=r"\[1\]: key 'caption' should be a list of strings"):
        read_retrieval(tmp_path / "coco_karpathy_test.json", tmp_path / "images")


def test_question_processing_as_lavis_blip_question():
    assert process_question('What is "this" (thing)?  ') == "what is this thing?"
    assert process_question("a b c d", max_words=2) == "a b"


def test_prediction_log_ignores_and_cuts_a_partial_last_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": 1, "prediction": "red"}\n{"id": "2", "image": "x.jpg", "skipped": "bad"}\n{"id": 3, "pred')
    predictions, skipped = PredictionLog.read([path])
    assert predictions == {1: "red"} and skipped == {"2": {"image": "x.jpg", "reason": "bad"}}
    with PredictionLog(path) as log:
        log.write([{"id": 3, "prediction": "blue"}])
    assert PredictionLog.read([path])[0] == {1: "red", 3: "blue"}
    path.write_text('{"id": 1, "prediction": "red"}\nnot json\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not a predictions record"):
        PredictionLog.read([path])


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    make_opt_tokenizer(root / "opt")
    make_t5_tokenizer(root / "t5")
    return root


@pytest.mark.slow
def test_lavis_min_len_counts_bos_and_prompt_for_opt_start_token_for_t5(tokenizer_dirs):
    opt = build_model("vit_tiny+qformer_tiny+opt_tiny", language={"tokenizer": str(tokenizer_dirs / "opt")})
    prompt_ids = opt.language.tokenizer("a photo of", add_special_tokens=False).input_ids
    assert opt.language.tokens_before_generation("a photo of") == 1 + len(prompt_ids)  # BOS + prompt
    options = generation_options(opt.language, recipe("coco_caption"), ["a photo of"] * 2)
    assert options["min_new_tokens"] == 8 - 1 - len(prompt_ids)
    assert (options["num_beams"], options["max_new_tokens"]) == (5, 30)
    vqa = generation_options(opt.language, recipe("vqav2"), ["Question: what? Short answer:"])
    assert (vqa["min_new_tokens"], vqa["max_new_tokens"], vqa["length_penalty"]) == (0, 10, 0.0)

    t5 = build_model("vit_tiny+qformer_tiny+flant5_tiny", language={"tokenizer": str(tokenizer_dirs / "t5")})
    assert t5.language.tokens_before_generation("a photo of") == 1  # the decoder start token
    assert generation_options(t5.language, recipe("coco_caption"), ["a photo of"])["min_new_tokens"] == 7
    assert generation_options(t5.language, recipe("vqav2"), ["q"])["length_penalty"] == -1.0
    nocaps = generation_options(t5.language, recipe("nocaps"), ["a photo of"])
    assert (nocaps["max_new_tokens"], nocaps["min_new_tokens"], nocaps["length_penalty"]) == (80, 9, 1.0)


def test_decoding_cleans_tokenisation_spaces(tokenizer_dirs):
    model = build_model("vit_tiny+qformer_tiny+opt_tiny", language={"tokenizer": str(tokenizer_dirs / "opt")})
    tokenizer = model.language.tokenizer
    ids = tokenizer("a dog . is it ?", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "a dog . is it ?"  # the tokenizer itself keeps the spaces
    assert model.language.decode_generated(torch.tensor([[2] + ids])) == ["a dog. is it?"]


@pytest.mark.parametrize("language", ["opt_tiny", "flant5_tiny"])
def test_generation_prompts_are_not_truncated(language, tokenizer_dirs, monkeypatch):
    folder = tokenizer_dirs / ("opt" if language == "opt_tiny" else "t5")
    model = build_model(f"vit_tiny+qformer_tiny+{language}", language={"tokenizer": str(folder)}).eval()
    model.language.max_text_length = 4  # a training limit must not cut a question
    seen = {}

    def capture(prefix_embeds, prefix_mask, tokens, options, **kwargs):
        seen["width"] = tokens["input_ids"].shape[1]
        return [""] * len(prefix_embeds)

    monkeypatch.setattr(model.language, "generate_after_soft_prompt", capture)
    prompt = "Question: how many cats are laying on the couch? Short answer:"
    model.generate(torch.zeros(1, 3, model.vision.image_size, model.vision.image_size), [prompt], task="vqa")
    assert seen["width"] == len(model.language.tokenizer(prompt).input_ids) > 4


def test_flickr30k_karpathy_ids_are_file_stems(tmp_path):
    # dataset_flickr30k.json: no cocoid and no filepath; images sit directly in the image folder.
    records = []
    for number, name in enumerate(("1000092795", "10002456")):
        records.append({"filename": f"{name}.jpg", "imgid": number, "split": "test", "sentids": [0],
                        "sentences": [{"tokens": ["a", "dog"], "raw": f"A dog {number}.", "imgid": number,
                                       "sentid": 0}]})
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": records, "dataset": "flickr30k"}))
    dataset = read_retrieval(path, tmp_path / "flickr30k-images")
    assert dataset.image_ids == ["1000092795", "10002456"]
    assert dataset.images[1] == tmp_path / "flickr30k-images" / "10002456.jpg"
    assert dataset.texts == ["A dog 0.", "A dog 1."] and dataset.txt2img == [0, 1]
