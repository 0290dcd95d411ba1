"""The data layer: caption normalisation, the five formats, and the training loader's guarantees."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import torch

from blip2kit.core.data import (
    AllSamplesBadError,
    AnnotationError,
    DataLoaderStateError,
    DataSourceConfig,
    build_train_loader,
    normalize_caption,
    read_indexed_source,
)
from blip2kit.core.data.webdataset import expand_shards, read_shard
from blip2kit.plugins.vision.common import build_transform
from data_fixtures import (
    captions_for,
    image_bytes,
    write_coco,
    write_folder,
    write_jsonl,
    write_lavis_json,
    write_shards,
)

TRANSFORM = build_transform(16, train=True)


def lavis_pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS BlipCaptionProcessor.pre_caption, written out from its documented steps as the oracle."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


# -- normalisation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog.", "a dog"),
        ("Two  cats (sleeping)!", "two cats sleeping"),
        ('He said: "hi"; ok~', "he said hi ok"),
        ("a,b-c?'d'", "a,b-c?'d'"),  # commas, hyphens, ? and quotes are kept, as in LAVIS
        ("   spaced   out   ", "spaced out"),
        ("one\ttab", "one\ttab"),  # a lone tab is not collapsed by LAVIS's \s{2,}
        ("line\n", "line"),
        ("...", ""),
        ("#1 *best* day", "1 best day"),
    ],
)
def test_normalize_caption_hand_computed(raw, expected):
    assert normalize_caption(raw) == expected
    assert lavis_pre_caption(raw) == expected


def test_normalize_caption_truncates_to_max_words():
    text = " ".join(f"W{i}" for i in range(60))
    assert normalize_caption(text) == " ".join(f"w{i}" for i in range(50))
    assert normalize_caption(text, max_words=3) == "w0 w1 w2"
    with pytest.raises(TypeError, match="must be a string"):
        normalize_caption(None)


# -- formats -------------------------------------------------------------------------------------


def _expected_captions(count):
    return sorted(tuple(captions_for(i)) for i in range(count))


@pytest.mark.parametrize("writer", [write_coco, write_lavis_json, write_jsonl])
def test_annotation_formats_read_one_sample_per_image(tmp_path, writer):
    path = writer(tmp_path, 5)
    fmt = {write_coco: "coco", write_lavis_json: "lavis_json", write_jsonl: "jsonl"}[writer]
    samples = read_indexed_source(DataSourceConfig(format=fmt, path=str(path)))
    assert len(samples) == 5
    assert sorted(tuple(s.captions) for s in samples) == _expected_captions(5)
    assert all(s.image.is_file() for s in samples)
    if fmt == "coco":
        assert sorted(s.image_id for s in samples) == [100, 101, 102, 103, 104]


def test_folder_format_reads_sidecar_captions(tmp_path):
    folder = write_folder(tmp_path, 3)
    samples = read_indexed_source(DataSourceConfig(format="folder", path=str(folder)))
    assert [s.image_id for s in samples] == ["img000.jpg", "img001.jpg", "img002.jpg"]
    assert [s.captions for s in samples] == [captions_for(i) for i in range(3)]


def test_image_root_is_honoured(tmp_path):
    path = write_jsonl(tmp_path / "ann", 2, image_root=tmp_path / "pictures")
    with pytest.raises(AnnotationError, match="image_root"):
        read_indexed_source(DataSourceConfig(format="jsonl", path=str(path), image_root=str(tmp_path / "nope")))
    samples = read_indexed_source(DataSourceConfig(format="jsonl", path=str(path), image_root=str(tmp_path / "pictures")))
    assert all(s.image.parent == tmp_path / "pictures" and s.image.is_file() for s in samples)


def test_webdataset_shards_stream_txt_and_json_members(tmp_path):
    pattern = write_shards(tmp_path, 6, per_shard=4)
    shards = expand_shards(pattern)
    assert [s.name for s in shards] == ["shards-000.tar", "shards-001.tar"]
    assert expand_shards(str(tmp_path / "shards-*.tar")) == shards
    samples = [s for shard in shards for s in read_shard(shard)]
    assert [s.captions for s in samples] == [captions_for(i) for i in range(6)]
    assert all(s.problem is None and s.image_bytes for s in samples)
    assert samples[1].image_id == 1 and samples[0].image_id == "sample00000"


def test_brace_expansion(tmp_path):
    for name in ("a-08.tar", "a-09.tar", "a-10.tar", "b-x.tar", "b-y.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_shards(str(tmp_path / "a-{08..10}.tar"))] == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert [p.name for p in expand_shards([str(tmp_path / "b-{x,y}.tar")])] == ["b-x.tar", "b-y.tar"]
    with pytest.raises(AnnotationError, match="do not exist"):
        expand_shards(str(tmp_path / "a-{00..01}.tar"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[{"image": "x.png", "caption": "a"}, {"caption": "b"}]', r"train\.json record 1 has no 'image' key"),
        ('[{"image": "x.png", "caption": 3}]', r"record 0 key 'caption' must be a string or a list"),
        ('[{"image": "x.png", "caption": ["a", 5]}]', r"record 0 key 'caption' item 1 must be a string"),
        ('[{"image": "x.png", "caption": "a"},', r"train\.json is not valid JSON \(line 1"),
        ('{"images": []}', r"lavis_json file must hold a JSON list"),
    ],
)
def test_annotation_errors_name_file_record_and_key(tmp_path, content, match):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=match):
        read_indexed_source(DataSourceConfig(format="lavis_json", path=str(path)))


def test_coco_and_jsonl_errors(tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(AnnotationError, match=r"annotations record 0: image_id 2 is not in 'images'"):
        read_indexed_source(DataSourceConfig(format="coco", path=str(coco)))
    coco.write_text(json.dumps({"images": [{"file_name": "a.png"}], "annotations": []}))
    with pytest.raises(AnnotationError, match=r"images record 0 has no 'id' key"):
        read_indexed_source(DataSourceConfig(format="coco", path=str(coco)))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png" "caption": "y"}\n')
    with pytest.raises(AnnotationError, match=r"x\.jsonl line 2 is not valid JSON"):
        read_indexed_source(DataSourceConfig(format="jsonl", path=str(jsonl)))
    with pytest.raises(AnnotationError, match="does not exist"):
        read_indexed_source(DataSourceConfig(format="jsonl", path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="image_roots"):
        DataSourceConfig(format="jsonl", path="x", image_roots="y")


# -- the loader ----------------------------------------------------------------------------------


def _stream(loader, batches):
    return [next(loader) for _ in range(batches)]


def _equal(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a["text_input"] == b["text_input"]
        assert a["image_ids"] == b["image_ids"]
        key = "pixels" if "pixels" in a else "image_features"
        assert torch.equal(a[key], b[key])


def _merge_ranks(per_rank):
    """Concatenate the ranks' batches k into one global batch k."""
    merged = []
    for parts in zip(*per_rank):
        key = "pixels" if "pixels" in parts[0] else "image_features"
        merged.append({key: torch.cat([p[key] for p in parts]),
                       "text_input": sum((p["text_input"] for p in parts), []),
                       "image_ids": sum((p["image_ids"] for p in parts), [])})
    return merged


@pytest.fixture(params=["jsonl", "coco", "webdataset"])
def source(request, tmp_path):
    if request.param == "jsonl":
        return {"format": "jsonl", "path": str(write_jsonl(tmp_path, 10))}
    if request.param == "coco":
        return {"format": "coco", "path": str(write_coco(tmp_path, 10))}
    return {"format": "webdataset", "path": write_shards(tmp_path, 10, per_shard=3)}


def test_batches_are_deterministic_and_cover_the_data(source):
    make = lambda seed: build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=seed)  # noqa: E731
    first = _stream(make(7), 10)  # two epochs of 5 batches of 2
    _equal(first, _stream(make(7), 10))
    batch = first[0]
    assert batch["pixels"].shape == (2, 3, 16, 16) and batch["pixels"].dtype == torch.float32
    epoch0 = sorted(str(i) for b in first[:5] for i in b["image_ids"])
    assert len(set(epoch0)) == 10  # every image once per epoch
    normalised = {normalize_caption(c) for i in range(10) for c in captions_for(i)}
    assert all(c in normalised for b in first for c in b["text_input"])
    # a new epoch reshuffles and re-augments
    assert [b["image_ids"] for b in first[:5]] != [b["image_ids"] for b in first[5:]]
    assert [b["image_ids"] for b in first[:5]] != [b["image_ids"] for b in _stream(make(8), 5)]


def test_one_process_at_2b_equals_two_processes_at_b(source):
    single = _stream(build_train_loader([source], transform=TRANSFORM, batch_size=4, seed=3), 5)
    ranks = [_stream(build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=3, rank=r,
                                        world_size=2), 5) for r in range(2)]
    _equal(single, _merge_ranks(ranks))


def test_resume_mid_epoch_sees_the_same_batches(source):
    reference = _stream(build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=1), 8)
    loader = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=1)
    _stream(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))  # it survives JSON, as checkpoints store it
    assert state["epoch"] == 0 and state["samples_done"] == 6
    resumed = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=1)
    resumed.load_state_dict(state)
    _equal(reference[3:], _stream(resumed, 5))
    assert resumed.epoch == 1
    # two processes resume from the single process's position (same global batch)
    ranks = []
    for rank in range(2):
        part = build_train_loader([source], transform=TRANSFORM, batch_size=1, seed=1, rank=rank, world_size=2)
        part.load_state_dict(state)
        ranks.append(_stream(part, 5))
    _equal(reference[3:], _merge_ranks(ranks))


def test_load_state_dict_refuses_other_data_or_batch(tmp_path):
    source = {"format": "jsonl", "path": str(write_jsonl(tmp_path, 8))}
    loader = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=1)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataLoaderStateError, match="global batches of 4"):
        build_train_loader([source], transform=TRANSFORM, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(DataLoaderStateError, match="seed 1"):
        build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=2).load_state_dict(state)


def _break_images(folder, names):
    (folder / names[0]).write_bytes(b"")  # empty file
    data = (folder / names[1]).read_bytes()
    (folder / names[1]).write_bytes(data[: len(data) // 3])  # truncated
    (folder / names[2]).unlink()  # missing
    (folder / names[3]).write_bytes(b"not an image at all")  # corrupt


def test_bad_samples_are_skipped_counted_named_and_replaced(tmp_path, caplog):
    path = write_jsonl(tmp_path, 12)
    lines = path.read_text().splitlines()
    record = json.loads(lines[4])
    record["caption"] = ["...", "  "]  # empty after normalisation
    lines[4] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    _break_images(tmp_path / "images", ["img000.png", "img001.png", "img002.png", "img003.png"])
    source = {"format": "jsonl", "path": str(path)}
    loader = build_train_loader([source], transform=TRANSFORM, batch_size=3, seed=0)
    batches = _stream(loader, 8)  # two epochs
    assert all(b["pixels"].shape[0] == 3 for b in batches)
    assert loader.bad_samples.count == 5
    reasons = dict(loader.bad_samples.records)
    named = " ".join(reasons)
    for name in ("img000", "img001", "img002", "img003", "img004"):
        assert name in named
    assert any("empty caption" in r for r in reasons.values())
    assert any("does not exist" in r for r in reasons.values())
    assert "5 skipped" in loader.bad_samples.summary()
    logged = [r.getMessage() for r in caplog.records if r.name == "blip2kit.data"]
    assert len(logged) == 5 and all(m.startswith("skipping bad sample") for m in logged)
    seen = {i for b in batches for i in b["image_ids"]}
    assert not seen & {"images/img000.png", "images/img001.png", "images/img002.png", "images/img003.png", "images/img004.png"}
    # replacements are deterministic across world sizes too
    ranks = [_stream(build_train_loader([source], transform=TRANSFORM, batch_size=1, seed=0, rank=r, world_size=3), 8)
             for r in range(3)]
    _equal(batches, _merge_ranks(ranks))


def test_bad_shard_members_and_a_truncated_shard(tmp_path):
    pattern = write_shards(tmp_path, 8, per_shard=4)
    with tarfile.open(tmp_path / "shards-000.tar", "w") as tar:  # rewrite shard 0 with bad members
        for name, data in [("a.jpg", b"garbage"), ("a.txt", b"a cat"), ("b.jpg", image_bytes(1)),
                           ("c.txt", b"caption without image"), ("d.jpg", image_bytes(2)), ("d.json", b"{oops")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = (tmp_path / "shards-001.tar").read_bytes()
    (tmp_path / "shards-001.tar").write_bytes(whole[: 512 * 6 + 100])  # cut inside the 3rd member's data
    loader = build_train_loader([{"format": "webdataset", "path": pattern}], transform=TRANSFORM, batch_size=2,
                                seed=0)
    batch = next(loader)
    assert batch["pixels"].shape[0] == 2
    named = " | ".join(f"{w}: {r}" for w, r in loader.bad_samples.records)
    assert loader.bad_samples.count >= 1
    for expected in ("a.jpg", "no caption member", "no image member", "unreadable"):
        if expected not in named:
            _stream(loader, 3)  # read on until every bad member has come up
            named = " | ".join(f"{w}: {r}" for w, r in loader.bad_samples.records)
    for expected in ("a.jpg", "no caption member", "no image member", "caption member unreadable",
                     "shards-001.tar unreadable"):
        assert expected in named, named


def test_all_bad_data_stops_with_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path, 4)
    for name in ("img000.png", "img001.png", "img002.png", "img003.png"):
        (tmp_path / "images" / name).write_bytes(b"broken")
    loader = build_train_loader([{"format": "jsonl", "path": str(path)}], transform=TRANSFORM, batch_size=2, seed=0)
    with pytest.raises(AllSamplesBadError, match=r"every sample of jsonl source .*train\.jsonl.* is bad \(4 bad"):
        next(loader)


def test_loader_argument_errors(tmp_path):
    source = {"format": "jsonl", "path": str(write_jsonl(tmp_path, 3))}
    with pytest.raises(ValueError, match="fewer than one global batch of 4"):
        build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="give a transform"):
        build_train_loader([source], transform=None, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="format"):
        build_train_loader([{"format": "tsv", "path": "x"}], transform=TRANSFORM, batch_size=1, seed=0)


@pytest.mark.parametrize(("cut", "last_good"), [(512 * 5 + 100, "sample00004"), (512 * 6 + 100, "sample00004"),
                                                 (512 * 11, "sample00005")])
def test_a_truncated_shard_is_reported_not_silently_shortened(tmp_path, cut, last_good):
    pattern = write_shards(tmp_path, 8, per_shard=4)
    shard = expand_shards(pattern)[1]
    shard.write_bytes(shard.read_bytes()[:cut])  # cut in a header, in member data, at a member boundary
    samples = list(read_shard(shard))
    good = [s.key.split("#")[1] for s in samples if s.problem is None]
    assert good[-1] == last_good
    assert "truncated" in samples[-1].problem or "unexpected end" in samples[-1].problem


@pytest.mark.slow  # starting worker processes takes seconds
def test_worker_processes_give_the_same_batches_and_bad_samples(tmp_path):
    path = write_jsonl(tmp_path, 9)
    _break_images(tmp_path / "images", ["img000.png", "img001.png", "img002.png", "img003.png"])
    source = {"format": "jsonl", "path": str(path)}
    in_process = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=5)
    reference = _stream(in_process, 6)  # 4 batches per epoch: into the second epoch
    with_workers = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=5, num_workers=2)
    batches = _stream(with_workers, 3)
    resumed = build_train_loader([source], transform=TRANSFORM, batch_size=2, seed=5, num_workers=2)
    resumed.load_state_dict(with_workers.state_dict())
    _equal(reference, batches + _stream(resumed, 3))
    assert sorted(with_workers.bad_samples.records) == sorted(in_process.bad_samples.records[: with_workers.bad_samples.count])
    assert with_workers.bad_samples.count >= 1


def test_stream_with_bad_members_resumes_and_splits_exactly(tmp_path):
    pattern = write_shards(tmp_path, 12, per_shard=4)
    with tarfile.open(tmp_path / "shards-003.tar", "w") as tar:  # an extra shard of bad members
        for name, data in [("x.jpg", b"garbage"), ("x.txt", b"x"), ("y.png", image_bytes(3, "PNG")), ("y.txt", b"...")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = {"format": "webdataset", "path": pattern.replace("002", "003")}
    make = lambda **kw: build_train_loader([source], transform=TRANSFORM, seed=2, shuffle_buffer=5, **kw)  # noqa: E731
    reference_loader = make(batch_size=4)
    reference = _stream(reference_loader, 7)  # 14 samples -> 3 batches per epoch
    assert reference_loader.bad_samples.count == 2
    partial = make(batch_size=4)
    _stream(partial, 2)
    resumed = make(batch_size=4)
    resumed.load_state_dict(partial.state_dict())
    _equal(reference[2:], _stream(resumed, 5))
    ranks = [_stream(make(batch_size=2, rank=r, world_size=2), 7) for r in range(2)]
    _equal(reference, _merge_ranks(ranks))


def test_indexed_sources_mix_into_a_webdataset_stream(tmp_path):
    sources = [{"format": "webdataset", "path": write_shards(tmp_path / "wds", 6, per_shard=2)},
               {"format": "coco", "path": str(write_coco(tmp_path / "coco", 5))}]
    loader = build_train_loader(sources, transform=TRANSFORM, batch_size=2, seed=9, shuffle_buffer=4)
    epoch = _stream(loader, 5)  # 11 images -> 5 batches, the 11th dropped
    ids = [i for b in epoch for i in b["image_ids"]]
    assert len(set(map(str, ids))) == 10
    assert {i for i in ids if isinstance(i, int) and i >= 100} and {i for i in ids if isinstance(i, str)}
    ranks = [_stream(build_train_loader(sources, transform=TRANSFORM, batch_size=1, seed=9, shuffle_buffer=4,
                                        rank=r, world_size=2), 5) for r in range(2)]
    _equal(epoch, _merge_ranks(ranks))
