"""``blip2kit demo world`` and ``blip2kit demo towers``: the synthetic shapes world and its frozen
towers, the ground the offline demo stands on.

``world`` writes scenes, captions and VQA questions in the public formats
(``blip2kit.core.data.shapes``). ``towers`` reruns the recipe that made the packaged ``shapes_vit``
and ``shapes_opt`` weights (the recipe their cards name, ``ComponentCard.recipe``, so core names no
plugin module).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path



def command_world(args: argparse.Namespace) -> int:
    from blip2kit.core.data import shapes

    sizes = dict(shapes.DEFAULT_SIZES)
    for split in shapes.SPLITS:
        value = getattr(args, split)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{split} must be at least 1 scene, got {value}")
            sizes[split] = value
    out = Path(args.out)
    if (out / "world.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a world (world.json); pass --overwrite or pick another --out")
    manifest = shapes.write_world(out, seed=args.seed, sizes=sizes, image_size=args.image_size)
    counts = ", ".join(f"{n} {split}" for split, n in manifest["sizes"].items())
    print(f"wrote the shapes world (seed {args.seed}: {counts} scenes) to {out}")
    print(f"held-out (shape, colour) pairs, only in test: {manifest['held_out']}")
    return 0


def command_towers(args: argparse.Namespace) -> int:
    from blip2kit.core.demo import towers_recipe

    recipe = towers_recipe()
    settings = recipe.FAST if args.fast else recipe.RecipeSettings()
    settings = type(settings)(**{**settings.__dict__, "seed": args.seed})
    report = recipe.make_towers(args.out, settings=settings, world_dir=args.world)
    timings = report["timings"]
    print(
        f"made shapes_vit and shapes_opt in {timings['total_seconds']:.0f} s "
        f"({report['threads']} threads) under {args.out}"
    )
    print(
        f"shapes_vit val R@1 image->text {report['vision']['val_r1_image_to_text']:.3f}, "
        f"text->image {report['vision']['val_r1_text_to_image']:.3f}"
    )
    print(
        f"text-only shapes_opt VQA accuracy on test questions: {report['llm_vqa_ceiling']:.3f} given the "
        f"true description (ceiling), {report['llm_vqa_floor']:.3f} given nothing (floor)"
    )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from blip2kit.core.demo import FAST, FULL, format_table, run_demo

    settings = FAST if args.fast else FULL
    settings = type(settings)(**{**settings.__dict__, "seed": args.demo_seed_value})
    if args.demo_threads is not None:
        settings = type(settings)(**{**settings.__dict__, "threads": args.demo_threads})
    if args.sequential:
        settings = type(settings)(**{**settings.__dict__, "parallel": False})
    report = run_demo(args.demo_out, settings)
    print()
    print(format_table(report))
    print(f"report: {Path(args.demo_out) / 'report.json'}; plots: {', '.join(report['plots'].values())}")
    print(f"try: blip2kit caption --model {Path(args.demo_out) / 'stage2'} IMAGE")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="BLIP-2 end to end offline in minutes: stage 1, stage 2, zero-shot VQA, the Figure 5 ablation",
        description="Without a step: write the shapes world, train stage 1 and stage 2 through `blip2kit "
        "train`, evaluate zero-shot VQA, captioning and retrieval on held-out scenes through `blip2kit eval`, "
        "run the paper's Figure 5 ablation, and write DIR/report.json, a table and plots.",
    )
    demo.add_argument("--out", dest="demo_out", metavar="DIR", default="demo-run", help="run directory (default demo-run)")
    demo.add_argument("--fast", action="store_true", help="a smoke run for CI (tiny world and budgets; numbers mean nothing)")
    demo.add_argument("--seed", dest="demo_seed_value", metavar="N", type=int, default=0, help="training seed (Q-Former init, data order); the world stays the packaged towers' (seed 0)")
    demo.add_argument("--threads", dest="demo_threads", metavar="N", type=int, default=None,
                      help="torch CPU threads (default 1: fastest on a machine busy with other jobs)")
    demo.add_argument("--sequential", action="store_true",
                      help="one job at a time, all output on the terminal (default on 2+ cores: the ablation "
                      "trains beside stage 1 and 2, its output in DIR/logs/)")
    demo.set_defaults(handler=command_demo)
    steps = demo.add_subparsers(dest="demo_step", required=False)

    world = steps.add_parser("world", help="write the synthetic shapes world in COCO/VQAv2/Karpathy formats")
    world.add_argument("--out", required=True, help="directory to write the world into")
    world.add_argument("--seed", type=int, default=0, help="the world is a function of this seed")
    world.add_argument("--image-size", type=int, default=64, help="side of the square scenes in pixels")
    for split in ("train", "val", "test"):
        world.add_argument(f"--{split}", type=int, default=None, help=f"number of {split} scenes")
    world.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    world.set_defaults(handler=command_world)

    towers = steps.add_parser("towers", help="pretrain the world's frozen ViT (CLIP-style) and text-only OPT")
    towers.add_argument("--out", required=True, help="directory for shapes_vit.safetensors, shapes_opt/, towers.json")
    towers.add_argument("--seed", type=int, default=0, help="seed of the world and of the training")
    towers.add_argument("--world", default=None, help="a world written by `blip2kit demo world` (same seed)")
    towers.add_argument("--fast", action="store_true", help="a seconds-long smoke run (tiny world, few steps)")
    towers.add_argument("--json", action="store_true", help="print the whole report as JSON")
    towers.set_defaults(handler=command_towers)
