"""Commented example job configs (``blip2kit config example stage1|stage2``).

Each runs as is on the tiny components once the dataset and the tiny tokenizers are given with
``--set`` (the header of each says which); the paper's full-size settings are in the comments.
"""

from __future__ import annotations

STAGE1 = """\
# Stage 1 of BLIP-2: train the Q-Former against a frozen image encoder (ITC + ITM + ITG).
# Runs on the tiny components as is; give the data and the Q-Former's BERT vocabulary:
#   blip2kit train stage1.yaml --set data.train.0.path=captions.jsonl \\
#       --set model_overrides.bridge.tokenizer=DIR_WITH_VOCAB_TXT
# Full size (paper): model: vit_g+qformer, max_steps 250000, batch 1680 over all devices.
model: vit_tiny+qformer_tiny          # vision+bridge = a stage-1 model
model_overrides:                      # per-slot component settings
  bridge: {}                          # e.g. {tokenizer: bert-base-uncased}
precision: fp32                       # policy: fp32 | bf16 | fp16 | half (bf16 where supported)
output_dir: runs/stage1               # config, metrics, loss.png and checkpoints/ go here
data:
  train:                              # one or more sources, concatenated
    - format: jsonl                   # coco | lavis_json | jsonl | folder | webdataset
      path: captions.jsonl            # set with --set data.train.0.path=...
      image_root: null                # images relative to the file's folder when null
  max_words: 50                       # captions cut to 50 words, as LAVIS
train:
  max_steps: 20                       # paper: 250000
  batch_size: 4                       # per device per micro-step (LAVIS: 100)
  grad_accum: 1
  lr: 1.0e-4                          # peak, after linear warmup (paper: 1e-4)
  min_lr: 1.0e-5                      # cosine floor, reached at max_steps
  warmup_steps: 2                     # paper: 2000
  grad_clip: null                     # global-norm clipping; null = none (as LAVIS)
  seed: 42
  save_every: 10
  keep_last: 2
  log_every: 1
optimizer:
  betas: [0.9, 0.98]                  # the paper; LAVIS' released configs use [0.9, 0.999]
  weight_decay: 0.05                  # not on biases and norms
deepspeed:
  zero_stage: 2                       # 0-3; 3 also partitions the frozen towers
  offload_optimizer: false            # optimizer state on the CPU
  offload_params: false               # parameters on the CPU (stage 3)
"""

STAGE2 = """\
# Stage 2 of BLIP-2: the Q-Former's queries become a soft prompt for a frozen LLM.
# Starts from a stage-1 run's bridge (init_from). Runs on the tiny components as is; give:
#   blip2kit train stage2.yaml --set data.train.0.path=captions.jsonl \\
#       --set init_from=runs/stage1 --set model_overrides.language.tokenizer=DIR_WITH_OPT_TOKENIZER
# Full size (paper): model: vit_g+qformer+opt_2.7b, max_steps 80000, min_lr 5e-5.
model: vit_tiny+qformer_tiny+opt_tiny # vision+bridge+language = a stage-2 model
model_overrides:
  language: {}                        # e.g. {tokenizer: facebook/opt-2.7b}
init_from: runs/stage1                # a stage-1 run directory or its checkpoint's model/
precision: fp32                       # policy: fp32 | bf16 | fp16 | half (bf16 where supported)
frozen_llm_dropout: as_released       # as_released: LLM dropout on in training, as LAVIS; off
output_dir: runs/stage2
data:
  train:
    - format: jsonl
      path: captions.jsonl
      image_root: null
train:
  max_steps: 20                       # paper: 80000
  batch_size: 4
  grad_accum: 1
  lr: 1.0e-4
  min_lr: 5.0e-5                      # paper's stage-2 floor
  warmup_steps: 2                     # paper: 2000
  seed: 42
  save_every: 10
  keep_last: 2
  log_every: 1
optimizer:
  betas: [0.9, 0.98]
  weight_decay: 0.05
deepspeed:
  zero_stage: 2
"""

EXAMPLES = {"stage1": STAGE1, "stage2": STAGE2}

__all__ = ["EXAMPLES", "STAGE1", "STAGE2"]
