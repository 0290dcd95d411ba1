"""Tiny tokenizers in the real public formats, for tests and the demo (no download).

``make_opt_tokenizer`` writes a byte-level BPE tokenizer with OPT's special tokens (<s>=0, <pad>=1,
</s>=2, <unk>=3) that prepends </s> as OPT's does; ``make_t5_tokenizer`` writes a Unigram
tokenizer with T5's (<pad>=0, </s>=1, <unk>=2) that appends </s>. Both are saved as a
transformers tokenizer directory and loaded back with ``AutoTokenizer``, the way the language
models load theirs from config ``tokenizer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CORPUS = (
    "a photo of a red circle on a blue square",
    "two cats laying on a couch next to a remote",
    "a green triangle above a small yellow circle",
    "Question: what color is the circle? Short answer: red",
    "Question: how many cats are there? Answer: two",
    "a man riding a horse on the beach at sunset\n",
    "the dog is sitting in the grass near the tree\n",
)


def make_opt_tokenizer(directory: str | Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 400) -> Any:
    """Byte-level BPE with OPT's special tokens; "\\n" is a single token. Returns the loaded one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    # OPT starts every sequence with </s> (its BOS).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def make_t5_tokenizer(directory: str | Path, corpus: Sequence[str] = CORPUS, vocab_size: int = 200) -> Any:
    """Unigram with T5's special tokens that appends </s>. Returns the loaded one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


__all__ = ["CORPUS", "make_opt_tokenizer", "make_t5_tokenizer"]
