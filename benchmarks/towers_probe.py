"""What the frozen shapes_vit tells the Q-Former: linear probes of its outputs, and the retrieval ceiling.

The demo's stage 1 can only match captions to scenes by what the frozen image tower encodes. This
benchmark measures that directly, with no Q-Former training:

* a linear probe (logistic regression, full batch) on the tower's outputs after a parameter-free
  LayerNorm (the Q-Former's ``ln_vision`` at init), flattened over tokens, trained on the world's
  train scenes and scored on its test scenes, for the count and the leftmost object's colour,
  shape, size and position, beside the majority-class rate;
* the best text -> image R@1 on the test scenes of a matcher that knows only part of each scene
  (e.g. only the colours left to right): the mean over scenes of 1 / (test scenes sharing it).

Writes ``benchmarks/results/towers-probe-<environment>.json``. ``--vision-weights`` probes another
tower file (e.g. a retrained one from ``blip2kit demo towers``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.environment import RESULTS, describe, write_result

# What a matcher may know of a scene, each a function of the scene's objects (left to right).
PARTIAL_KNOWLEDGE: dict[str, Callable[[Any], tuple]] = {
    "colours as a set": lambda scene: tuple(sorted(o.colour for o in scene.objects)),
    "colours left to right": lambda scene: tuple(o.colour for o in scene.objects),
    "colours and sizes left to right": lambda scene: tuple((o.colour, o.size) for o in scene.objects),
    "full description": lambda scene: tuple((o.colour, o.size, o.shape, o.slot) for o in scene.objects),
}
PROBED: dict[str, Callable[[Any], Any]] = {
    "count": lambda scene: len(scene.objects),
    "leftmost colour": lambda scene: scene.objects[0].colour,
    "leftmost shape": lambda scene: scene.objects[0].shape,
    "leftmost size": lambda scene: scene.objects[0].size,
    "leftmost position": lambda scene: scene.objects[0].slot,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", type=Path, default=None,
                        help="a shapes world folder (default: write the seed-0 world to a temporary folder)")
    parser.add_argument("--vision-weights", default=None,
                        help="a shapes_vit safetensors file (default: the packaged tower)")
    parser.add_argument("--probe-steps", type=int, default=300, help="full-batch Adam steps per probe")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the JSON goes")


def encode(model: Any, world: Path, scenes: list[Any]) -> Any:
    """The frozen tower's outputs [n, N, W] for scenes (eval transform), in batches of 100."""
    import torch

    from blip2kit.core.data.images import load_image

    transform = model.vision.transform(train=False)
    parts = []
    with torch.no_grad():
        for start in range(0, len(scenes), 100):
            pixels = torch.stack([transform(load_image(world / "images" / s.file_name))
                                  for s in scenes[start:start + 100]])
            parts.append(model.vision(pixels))
    return torch.cat(parts)


def probe(train_x: Any, train_labels: list[Any], test_x: Any, test_labels: list[Any], steps: int) -> dict[str, float]:
    """Test accuracy of a logistic-regression probe, and the test split's majority-class rate."""
    import torch
    import torch.nn.functional as F

    classes = sorted(set(train_labels) | set(test_labels), key=str)
    train_y = torch.tensor([classes.index(v) for v in train_labels])
    test_y = torch.tensor([classes.index(v) for v in test_labels])
    linear = torch.nn.Linear(train_x.shape[1], len(classes))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (linear(test_x).argmax(1) == test_y).float().mean().item()
    majority = Counter(test_labels).most_common(1)[0][1] / len(test_labels)
    return {"accuracy": round(accuracy, 4), "majority": round(majority, 4), "classes": len(classes)}


def retrieval_ceiling(scenes: list[Any], knowledge: Callable[[Any], tuple]) -> float:
    """Best expected text -> image R@1 when scenes are told apart only by ``knowledge``."""
    groups = Counter(knowledge(scene) for scene in scenes)
    return sum(1 / groups[knowledge(scene)] for scene in scenes) / len(scenes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from blip2kit.core.build import build_model
    from blip2kit.core.data import shapes

    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        world = args.world
        if world is None:
            world = Path(scratch) / "world"
            shapes.write_world(world, seed=0)
        scenes = shapes.read_scenes(world)
        train = [s for s in scenes if s.split == "train"]
        test = [s for s in scenes if s.split == "test"]
        vision = {} if args.vision_weights is None else {"pretrained": args.vision_weights}
        model = build_model("shapes_vit+qformer_tiny", vision=vision)
        model.eval()

        def features(split_scenes: list[Any]) -> Any:
            encoded = encode(model, world, split_scenes)  # (n, N, W)
            return F.layer_norm(encoded, encoded.shape[-1:]).flatten(1)  # (n, N*W)

        train_x, test_x = features(train), features(test)
    probes = {name: probe(train_x, [label(s) for s in train], test_x, [label(s) for s in test], args.probe_steps)
              for name, label in PROBED.items()}
    ceilings = {name: round(retrieval_ceiling(test, knowledge), 4) for name, knowledge in PARTIAL_KNOWLEDGE.items()}
    result = {
        "benchmark": "towers-probe",
        "environment": describe(),
        "vision_weights": args.vision_weights or "packaged",
        "train_scenes": len(train),
        "test_scenes": len(test),
        "feature_shape": list(train_x.shape[1:]),
        "linear_probes": probes,
        "text_to_image_r1_ceiling_by_knowledge": ceilings,
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("towers-probe", result, args.output_dir)
    for name, scores in probes.items():
        print(f"probe {name:<20} accuracy {scores['accuracy']:.3f}  (majority {scores['majority']:.3f})")
    for name, ceiling in ceilings.items():
        print(f"R@1 ceiling knowing {name:<34} {ceiling:.3f}")
    print(f"wrote {path}")
    return result
