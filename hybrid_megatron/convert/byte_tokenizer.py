"""The data pipeline's ``bytes`` tokenizer as Hugging Face tokenizer files (``tokenizer.json``).

``prepare-data --tokenizer bytes`` gives every UTF-8 byte ``b`` the id ``b`` and EOS the id 256. The same
ids in a ``tokenizers`` model: the byte-level pre-tokenizer maps each byte to one printable character
(GPT-2's table), and a BPE model with no merges whose vocabulary assigns each of those characters the
byte's value turns every byte into exactly one token. ``AutoTokenizer`` then encodes any text, non-ASCII
included, to ``list(text.encode("utf-8"))`` and decodes it back.
"""

from __future__ import annotations

from data_pipeline.tokenizer import BYTES_EOS

EOS_TOKEN = "<|endoftext|>"


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose ids equal the ``bytes`` tokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters, unordered
    table = _gpt2_byte_table()
    assert set(table.values()) == set(byte_to_char)
    vocab = {table[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = BYTES_EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False)


def _gpt2_byte_table() -> dict[int, str]:
    """byte -> character of the byte-level pre-tokenizer (GPT-2's ``bytes_to_unicode``): printable bytes map
    to themselves, the others to code points from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
