"""blip2kit's own beam search: the soft prompt and the prompt are prefilled once per image.

transformers' ``generate`` copies every input (32 query vectors + prompt) to each beam before the
first forward, so a 5-beam prefill costs five single ones. Here the decoder-only model runs the
prefill on one row per image and the beams copy its key/value cache when they first fork; an
encoder-decoder model encodes once and runs the decoder's first step (whose cross-attention keys
and values cover the whole encoder output) once per image, and the beams fork that cache.

Two scoring conventions, selectable (``GenerationOptions.beam_convention``), each reproducing its
reference token for token:

``"transformers"`` (transformers 5's ``generate``, blip2kit's default)
    A finished hypothesis scores ``sum log p / generated_length ** length_penalty``, the generated
    length counting the end token. The batch entry stops when the best running beam, normalised by
    the length generated so far, cannot beat the worst kept hypothesis. Candidates are the top
    ``2 * num_beams`` continuations; only an end token among the first ``num_beams`` finishes a
    hypothesis; the best ``num_beams`` unfinished ones run on.

``"lavis"`` (transformers 4.26's ``BeamSearchScorer``, what produced BLIP-2's published numbers)
    The length is that of the whole decoder sequence *before* the end token: BOS and prompt tokens
    (padding included) for a decoder-only model, the start token for an encoder-decoder one. The
    batch entry is done once it holds ``num_beams`` hypotheses and the best candidate score of this
    step divided by the current length ** length_penalty is no better than the worst hypothesis.
    Beams that reach ``max_new_tokens`` are added as hypotheses at the end; a hypothesis that
    stopped early gets its end token back in the output.

The repetition penalty follows each reference too: it applies to every token id of the decoder
sequence the reference keeps (transformers 5 with ``inputs_embeds``: the generated tokens only;
transformers 4.26 through LAVIS: BOS and prompt tokens as well), on log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from blip2kit.core.interfaces import BEAM_CONVENTIONS as CONVENTIONS

# The score transformers (both versions) gives to beams that must never be chosen.
NEVER = -1.0e9


@dataclass(frozen=True)
class BeamSettings:
    """What one beam search needs beyond the model."""

    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float
    repetition_penalty: float
    num_return_sequences: int
    eos_token_id: int
    pad_token_id: int
    convention: str = "transformers"


class BeamSteps(Protocol):
    """A model seen one decoding step at a time (rows: image-major, beam-minor)."""

    def first_logits(self) -> Tensor:
        """Next-token logits after the prompt: [B, V] (one row per image) or [B * beams, V]."""

    def reorder(self, rows: Tensor) -> None:
        """Make row ``i`` continue row ``rows[i]`` of the previous step (``rows``: [B * beams])."""

    def next_logits(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` [B * beams] to the rows -> next-token logits [B * beams, V]."""


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"beam_convention={convention!r} is not known; use 'transformers' (transformers 5's "
            "scoring, the default) or 'lavis' (transformers 4.26's, BLIP-2's published numbers)"
        )
    return convention


def penalise_repetition(log_probs: Tensor, history: Tensor, penalty: float, skip: Tensor | None = None) -> Tensor:
    """CTRL's repetition penalty on log-probabilities [R, V] of the ids in ``history`` [R, T]:
    negative scores are multiplied by ``penalty``, positive ones divided (as transformers does).
    ``skip`` [R]: how many leading history positions of each row are not penalised."""
    if penalty == 1.0 or history.shape[1] == 0:
        return log_probs
    if skip is not None:
        positions = torch.arange(history.shape[1], device=history.device)[None, :]
        history = history.masked_fill(positions < skip[:, None], log_probs.shape[-1])  # -> a spare column
    seen = torch.zeros(log_probs.shape[0], log_probs.shape[1] + 1, dtype=torch.bool, device=log_probs.device)
    seen = seen.scatter_(1, history, True)[:, :-1]  # [R, V]
    penalised = torch.where(log_probs < 0, log_probs * penalty, log_probs / penalty)
    return torch.where(seen, penalised, log_probs)


def step_log_probs(
    logits: Tensor, history: Tensor, generated: int, settings: BeamSettings, skip: Tensor | None = None
) -> Tensor:
    """Logits [R, V] -> processed log-probabilities: repetition penalty, then no end token before
    ``min_new_tokens`` new tokens."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    log_probs = penalise_repetition(log_probs, history, settings.repetition_penalty, skip)
    if generated < settings.min_new_tokens:
        log_probs[:, settings.eos_token_id] = -float("inf")
    return log_probs


def beam_search(
    steps: BeamSteps, prefix_ids: Tensor, settings: BeamSettings, penalty_skip: Tensor | None = None
) -> Tensor:
    """Decode with beams; the new tokens of the best ``num_return_sequences`` hypotheses per image.

    ``prefix_ids`` [B, P] is the decoder sequence the convention's reference starts from (what it
    penalises repetitions of and, for ``"lavis"``, counts in the length). ``penalty_skip`` [B]: how
    many leading tokens of each image's decoder sequence the repetition penalty ignores (transformers
    5 skips as many *generated* tokens as a decoder-only prompt has left padding, since it meant to
    skip padding in ``input_ids`` that ``inputs_embeds`` leaves empty). Returns [B * returned, G]:
    new tokens, the end token included where a hypothesis has one, padded as the reference pads.
    """
    check_convention(settings.convention)
    if penalty_skip is not None:
        penalty_skip = penalty_skip.repeat_interleave(settings.num_beams, dim=0)  # [B*beams]
    if settings.convention == "lavis":
        return _search_lavis(steps, prefix_ids, settings, penalty_skip)
    return _search_transformers(steps, prefix_ids, settings, penalty_skip)


def _rows(logits: Tensor, batch: int, num_beams: int) -> Tensor:
    """First-step logits as [B * beams, V], whichever shape the model gave."""
    if logits.shape[0] == batch * num_beams:
        return logits
    if logits.shape[0] != batch:
        raise RuntimeError(f"first_logits gave {logits.shape[0]} rows; expected {batch} or {batch * num_beams}")
    return logits.repeat_interleave(num_beams, dim=0)


def _search_transformers(
    steps: BeamSteps, prefix_ids: Tensor, settings: BeamSettings, penalty_skip: Tensor | None
) -> Tensor:
    """transformers 5's vectorised beam search (``GenerationMixin._beam_search``) in its scoring."""
    beams, limit = settings.num_beams, settings.max_new_tokens
    batch, device = prefix_ids.shape[0], prefix_ids.device
    candidates = 2 * beams  # one end token: 2 candidates per beam keep `beams` unfinished ones
    among_first = torch.arange(candidates, device=device) < beams  # only these may finish

    running = torch.zeros(batch, beams, limit, dtype=torch.long, device=device)  # new tokens so far
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = NEVER  # every beam starts as the same prompt: pick from the first only
    finished = torch.zeros(batch, beams, limit, dtype=torch.long, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    finished_scores = torch.full((batch, beams), NEVER, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    may_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(batch, device=device)[:, None] * beams  # [B, 1]
    prefix = prefix_ids.repeat_interleave(beams, dim=0)  # [B*beams, P]

    logits = _rows(steps.first_logits(), batch, beams)
    for generated in range(limit):
        history = torch.cat([prefix, running.view(batch * beams, limit)[:, :generated]], dim=1)
        log_probs = step_log_probs(logits, history, generated, settings, penalty_skip)  # [B*beams, V]
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(totals, k=candidates)  # [B, 2*beams], best first
        parent, token = top_index // vocab, top_index % vocab
        top_sequences = torch.gather(running, 1, parent[:, :, None].expand(-1, -1, limit)).clone()
        top_sequences[:, :, generated] = token
        stops = (token == settings.eos_token_id) | (generated + 1 >= limit)  # [B, 2*beams]

        # The best unfinished candidates run on.
        open_scores = top_scores + stops.to(torch.float32) * NEVER
        keep = torch.topk(open_scores, k=beams)[1]  # [B, beams]
        running = torch.gather(top_sequences, 1, keep[:, :, None].expand(-1, -1, limit))
        running_scores = torch.gather(open_scores, 1, keep)
        rows = (torch.gather(parent, 1, keep) + batch_offset).view(-1)  # [B*beams]

        # Candidates that finished among the first `beams` join the kept hypotheses if better.
        just_finished = stops & among_first[None, :]
        scores = top_scores / ((generated + 1) ** settings.length_penalty)
        scores = scores + (~may_improve).to(torch.float32) * NEVER
        scores = scores + (~just_finished) * NEVER
        merged_scores = torch.cat([finished_scores, scores], dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        merged = torch.cat([finished, top_sequences], dim=1)
        finished = torch.gather(merged, 1, best[:, :, None].expand(-1, -1, limit))
        merged_lengths = torch.cat([finished_lengths, torch.full_like(top_scores, generated + 1, dtype=torch.long)], 1)
        finished_lengths = torch.gather(merged_lengths, 1, best)
        finished_scores = torch.gather(merged_scores, 1, best)
        is_finished = torch.gather(torch.cat([is_finished, just_finished], dim=1), 1, best)

        # Can the best running beam still beat the worst kept hypothesis? (length: so far)
        best_running = running_scores[:, :1] / ((generated + 1) ** settings.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEVER)
        may_improve = may_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        if not bool(may_improve.any()) or bool(stops.all()):
            break
        steps.reorder(rows)
        logits = steps.next_logits(running[:, :, generated].reshape(-1))

    returned = settings.num_return_sequences
    sequences = finished[:, :returned].reshape(batch * returned, limit)
    lengths = finished_lengths[:, :returned].reshape(-1)
    # transformers fills with the pad id, or with the end id where the pad id is 0 (`pad or eos`).
    fill = settings.pad_token_id if settings.pad_token_id else settings.eos_token_id
    width = int(lengths.max())
    positions = torch.arange(limit, device=device)[None, :]
    return sequences.masked_fill(positions >= lengths[:, None], fill)[:, :width]


@dataclass
class _Hypotheses:
    """The ``num_beams`` best finished hypotheses of one image, in transformers 4.26's scoring."""

    num_beams: int
    length_penalty: float
    entries: list[tuple[float, list[int]]]
    worst: float = 1e9

    def add(self, tokens: list[int], total_length: int, sum_log_probs: float) -> None:
        score = sum_log_probs / (total_length ** self.length_penalty)
        if len(self.entries) < self.num_beams or score > self.worst:
            self.entries.append((score, tokens))
            if len(self.entries) > self.num_beams:
                ranked = sorted((s, index) for index, (s, _) in enumerate(self.entries))
                del self.entries[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_log_probs: float, total_length: int) -> bool:
        if len(self.entries) < self.num_beams:
            return False
        return self.worst >= best_sum_log_probs / total_length ** self.length_penalty


def _search_lavis(
    steps: BeamSteps, prefix_ids: Tensor, settings: BeamSettings, penalty_skip: Tensor | None
) -> Tensor:
    """transformers 4.26's ``beam_search`` + ``BeamSearchScorer`` (what LAVIS ran) in its scoring."""
    beams, limit = settings.num_beams, settings.max_new_tokens
    batch, device = prefix_ids.shape[0], prefix_ids.device
    prefix_length = prefix_ids.shape[1]  # counted in every length, as 4.26 counted its input_ids
    hypotheses = [_Hypotheses(beams, settings.length_penalty, []) for _ in range(batch)]
    done = [False] * batch

    sequences = prefix_ids.repeat_interleave(beams, dim=0)  # [B*beams, P + generated]
    beam_scores = torch.zeros(batch, beams, device=device)
    beam_scores[:, 1:] = NEVER
    beam_scores = beam_scores.view(-1)
    logits = _rows(steps.first_logits(), batch, beams)
    generated = 0
    while True:
        log_probs = step_log_probs(logits, sequences, generated, settings, penalty_skip)  # [B*beams, V]
        vocab = log_probs.shape[-1]
        totals = (log_probs + beam_scores[:, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(totals, 2 * beams, dim=1, largest=True, sorted=True)
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        scores = top_scores.tolist()

        next_scores = torch.zeros(batch, beams, device=device)
        next_tokens = torch.full((batch, beams), settings.pad_token_id, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch, beams, dtype=torch.long, device=device)
        current_length = prefix_length + generated
        for image in range(batch):
            if done[image]:
                # A finished image's beams carry padding on at score 0; its hypotheses are final.
                next_rows[image] = image * beams
                continue
            chosen = []
            for rank, (parent, token, score) in enumerate(zip(parents[image], tokens[image], scores[image])):
                row = image * beams + parent
                if token == settings.eos_token_id:
                    if rank >= beams:
                        continue  # an end token below the first `beams` candidates is ignored
                    hypotheses[image].add(sequences[row, prefix_length:].tolist(), current_length, score)
                else:
                    chosen.append((score, token, row))
                if len(chosen) == beams:
                    break
            next_scores[image] = torch.tensor([c[0] for c in chosen], device=device)
            next_tokens[image] = torch.tensor([c[1] for c in chosen], device=device)
            next_rows[image] = torch.tensor([c[2] for c in chosen], device=device)
            done[image] = hypotheses[image].is_done(scores[image][0], current_length)
        beam_scores = next_scores.view(-1)
        rows = next_rows.view(-1)
        sequences = torch.cat([sequences[rows], next_tokens.view(-1, 1)], dim=1)
        generated += 1
        if all(done) or generated >= limit:
            break
        steps.reorder(rows)
        logits = steps.next_logits(next_tokens.view(-1))

    # Beams still running at the length limit become hypotheses, then the best are returned.
    for image in range(batch):
        if done[image]:
            continue
        for beam in range(beams):
            row = image * beams + beam
            hypotheses[image].add(sequences[row, prefix_length:].tolist(), sequences.shape[1],
                                  float(beam_scores[row]))
    outputs: list[list[int]] = []
    for entry in hypotheses:
        ranked = sorted(entry.entries, key=lambda scored: scored[0])
        for _ in range(settings.num_return_sequences):
            tokens_only = ranked.pop()[1]
            if len(tokens_only) < limit:
                tokens_only = tokens_only + [settings.eos_token_id]  # stopped early: its end token back
            outputs.append(tokens_only)
    width = max(len(tokens_only) for tokens_only in outputs)
    result = torch.full((len(outputs), width), settings.pad_token_id, dtype=torch.long, device=device)
    for index, tokens_only in enumerate(outputs):
        result[index, : len(tokens_only)] = torch.tensor(tokens_only, dtype=torch.long)
    return result


# -- transformers models, one step at a time ---------------------------------------------------------


class DecoderOnlySteps:
    """A transformers causal LM: the prefill runs once per image, the beams fork its cache.

    Inputs as transformers' generate builds them: positions from the mask (0 on padding), and no
    mask at all when nothing is padded (the attention then takes its unmasked path, as there).
    """

    def __init__(self, model: Any, inputs_embeds: Tensor, attention_mask: Tensor, num_beams: int) -> None:
        self.model, self.num_beams = model, num_beams
        self.inputs_embeds = inputs_embeds  # [B, L, hidden]
        self.mask = attention_mask  # [B, L]
        self.padded = not bool((attention_mask == 1).all())
        self.cache: Any = None
        self.rows_per_image = 1  # the cache holds one row per image until the beams fork

    def first_logits(self) -> Tensor:
        positions = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 0)  # [B, L]
        output = self.model(
            inputs_embeds=self.inputs_embeds, attention_mask=self.mask if self.padded else None,
            position_ids=positions, use_cache=True, logits_to_keep=1,
        )
        self.cache, self.next_position = output.cache, positions[:, -1:] + 1  # [B, 1]
        self.inputs_embeds = None
        return output.logits[:, -1]  # [B, V]

    def reorder(self, rows: Tensor) -> None:
        if self.rows_per_image == 1:
            rows = rows // self.num_beams  # the first fork: beam rows of the prefilled image row
            self.rows_per_image = self.num_beams
        self.cache.reorder_cache(rows)
        self.mask, self.next_position = self.mask[rows], self.next_position[rows]

    def next_logits(self, tokens: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        output = self.model(
            input_ids=tokens[:, None], attention_mask=self.mask if self.padded else None,
            position_ids=self.next_position, cache=self.cache, use_cache=True, logits_to_keep=1,
        )
        self.cache, self.next_position = output.cache, self.next_position + 1
        return output.logits[:, -1]  # [B*beams, V]


class EncoderDecoderSteps:
    """A transformers encoder-decoder: the encoder and the decoder's first step (the start token,
    whose cross-attention keys and values over the whole encoder output are the costly part) run
    once per image; the beams fork the decoder cache, self- and cross-attention alike."""

    def __init__(
        self, model: Any, inputs_embeds: Tensor, attention_mask: Tensor, num_beams: int, start_token_id: int
    ) -> None:
        self.model, self.num_beams, self.start_token_id = model, num_beams, start_token_id
        self.inputs_embeds, self.mask = inputs_embeds, attention_mask
        self.cache: Any = None
        self.forked = False

    def first_logits(self) -> Tensor:
        encoded = self.model.get_encoder()(inputs_embeds=self.inputs_embeds, attention_mask=self.mask)
        self.encoder_outputs = (encoded.last_hidden_state,)  # [B, L, d]
        self.inputs_embeds = None
        start = torch.full((self.mask.shape[0], 1), self.start_token_id, dtype=torch.long, device=self.mask.device)
        return self._decode(start)  # [B, V]

    def reorder(self, rows: Tensor) -> None:
        if not self.forked:
            rows = rows // self.num_beams  # the first fork: beam rows of each image's row
            hidden = self.encoder_outputs[0]
            self.encoder_outputs = (hidden.repeat_interleave(self.num_beams, dim=0),)  # [B*beams, L, d]
            self.mask = self.mask.repeat_interleave(self.num_beams, dim=0)
            self.forked = True
        self.cache.reorder_cache(rows)

    def next_logits(self, tokens: Tensor) -> Tensor:
        return self._decode(tokens[:, None])  # [B*beams, V]

    def _decode(self, decoder_input_ids: Tensor) -> Tensor:
        output = self.model(
            encoder_outputs=self.encoder_outputs, attention_mask=self.mask,
            decoder_input_ids=decoder_input_ids, cache=self.cache, use_cache=True,
        )
        self.cache = output.cache
        return output.logits[:, -1]


__all__ = [
    "BeamSettings",
    "BeamSteps",
    "CONVENTIONS",
    "DecoderOnlySteps",
    "EncoderDecoderSteps",
    "beam_search",
    "check_convention",
    "penalise_repetition",
]
