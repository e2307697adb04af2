"""The family's tokenizer: byte-level BPE fitted on the Gutenberg train split, offline.

Byte-level (GPT-2's pre-tokenizer and byte alphabet, no normalizer) so that every UTF-8
string round-trips exactly: ``decode(encode(x)) == x``. One special token,
``<|endoftext|>``, ends each book in the training stream; nothing is added automatically
(no BOS), matching the GPTQ evaluation protocol which scores windows cut mid-text.

CLI::

    python -m ptqscale.zoo.tokenizer --data ../shared/data/gutenberg-en --out tokenizer.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ptqscale.zoo.config import ZooConfig
from ptqscale.zoo.data import EOS, tokenizer_corpus

# The family's tokenizer, committed beside the embedded checkpoints.
FAMILY_TOKENIZER = Path(__file__).resolve().parent / "checkpoints" / "tokenizer.json"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Fit a byte-level BPE of ``vocab_size`` ids (the special token and 256 bytes included).

    Example::

        >>> tok = train_tokenizer(["the cat sat on the mat\\n"] * 50, vocab_size=300)
        >>> tok.decode(tok.encode("the mat!").ids)
        'the mat!'
    """
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no invented leading space)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def hf_tokenizer(tokenizer: Tokenizer | str | Path):
    """Wrap as ``transformers.PreTrainedTokenizerFast`` (what ``save_pretrained`` writes).

    ``<|endoftext|>`` serves as eos, bos and pad; ``clean_up_tokenization_spaces`` is off,
    since it would break the exact round trip (it deletes spaces before punctuation).
    """
    from transformers import PreTrainedTokenizerFast

    obj = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
    return PreTrainedTokenizerFast(
        tokenizer_object=obj, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The family tokenizer (default) or a tokenizer.json at ``path``."""
    path = Path(path) if path else FAMILY_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file {path}; build one with "
                                "`python -m ptqscale.zoo.tokenizer --data DIR --out FILE`")
    return Tokenizer.from_file(str(path))


def main(argv: list[str] | None = None) -> None:
    default = ZooConfig()
    p = argparse.ArgumentParser(prog="python -m ptqscale.zoo.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="gutenberg-en folder (train-*.jsonl.xz)")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab", type=int, default=default.vocab_size)
    p.add_argument("--chars", type=int, default=default.tokenizer_chars,
                   help="characters of the train split to fit on (deterministic subset)")
    args = p.parse_args(argv)
    ZooConfig(vocab_size=args.vocab, tokenizer_chars=args.chars)  # validates both
    t0 = time.time()
    texts = tokenizer_corpus(args.data, args.chars)
    tok = train_tokenizer(texts, args.vocab)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}, fitted on "
          f"{sum(map(len, texts)):,} chars of {len(texts)} books in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
