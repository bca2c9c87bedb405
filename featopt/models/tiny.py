"""Built-in tiny causal LMs and a tiny tokenizer, made in code: no files, no download.

They let every test and example run offline in seconds. The weights are random, so the
features they show mean nothing; what matters is that the shapes, hooks and code paths are
the same as for a real Hugging Face model of the same architecture.

``build_tiny(name)`` returns ``(model, tokenizer)`` where the model maps input ids of shape
``(batch, seq)`` with ``seq <= 64`` to logits of shape ``(batch, seq, vocab)``, vocab being
``len(tiny_tokenizer())`` (about 512), with 3 layers of width ``d_model = 64`` and 4 heads.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from featopt.errors import FeatoptError

TINY_MODELS = ("tiny-gpt2", "tiny-llama", "tiny-neox")
EOS = "<|endoftext|>"
VOCAB_SIZE = 512  # 1 special + 256 byte symbols + 255 merges
D_MODEL, N_LAYERS, N_HEADS, MAX_POSITIONS = 64, 3, 4, 64

# The merges are learned from this text. It is plain English so the tokens look like word
# pieces (" the", "ing") in examples; any text still encodes, byte by byte if need be.
_CORPUS = """\
Once upon a time there was a small town by the sea. The people of the town were fishermen
and farmers, and every morning they went out to work while the sun was rising over the water.
The children played on the beach and the old men sat in the shade and told stories about the
ships that had sailed away and never come back. One day a stranger came to the town. He was
tall and thin, and he carried a wooden box under his arm. Nobody knew where he had come from,
and nobody asked, because in that town it was thought rude to ask a traveller his business.
He took a room at the inn, and in the evening he opened the box and took out a little machine
made of brass and glass. When he turned the handle, the machine began to sing. It sang about
the mountains and the rivers, about the cities of the north and the deserts of the south, and
everyone who heard it stopped what they were doing and listened. The next morning the stranger
was gone, but the machine was still there on the table, and it is still singing to this day.
A language model reads a sequence of tokens and predicts the next one. Inside the model, each
layer writes to a residual stream, and a feature is a direction in that stream which is active
when the input contains some pattern: a word, a topic, a language, a number, or the start of a
new sentence. To understand a feature we look for the inputs that make it fire most strongly,
and then we check what the model does when we change the feature by hand. If the model behaves
as the description says it should, we have learned something about how the network works.
The weather today is warm and sunny, with a light wind from the west. Tomorrow there will be
clouds in the morning and rain in the afternoon, so remember to take an umbrella if you are
going outside. In the kitchen, mix two cups of flour with one cup of water and a pinch of salt,
knead the dough for ten minutes, and let it rest for an hour before you bake it in a hot oven.
She said that she would come home early, but the train was late and the station was crowded.
"What time is it?" he asked. "Nearly seven," she answered, "and I have not eaten all day."
Every spring the river rose and covered the fields, and the farmers moved their animals up the
hill until the water went down again. Their houses were built of stone, with small windows and
thick walls that kept them cool in summer and warm in winter. On market days the square was full
of people selling bread, cheese, apples, onions, fish and flowers, and the music of the band
could be heard from one end of the valley to the other. The mayor made a long speech each year.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 20 24 42 50 64 100 128 256 512 1000 2024 3.14 1/2 50%.
Code: def main(): return [x * 2 for x in range(10) if x % 3 == 0]  # print("hello, world")
"""


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the result is a JSON string (immutable).

    The BPE trainer picks the most frequent pair and breaks ties by the pair's token ids, which
    come from the sorted byte alphabet, so the merges do not depend on hash order: the tests
    check that two builds, in two processes, give the same vocab and merges.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    # ByteLevel maps every byte to a printable symbol, so any unicode string encodes and the
    # ByteLevel decoder gives it back exactly; no normalizer, so nothing is changed on the way.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about 512 tokens; ``<|endoftext|>`` is eos, bos, unk and pad.

    Like GPT-2 it adds no special tokens when encoding: ``tok("hi").input_ids`` are the text's
    own tokens, and ``tok.decode(ids)`` gives the text back byte for byte.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,  # it would drop spaces before punctuation: no round trip
        model_max_length=MAX_POSITIONS,
    )


def _config(name: str, vocab: int, eos_id: int):
    """The HF config for a tiny name; dropout is 0 so train() and eval() compute the same."""
    # "eager" is plain matmul + softmax: deterministic on every device, and it can return
    # attention weights; at seq <= 64 it is as fast as sdpa.
    ids = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, attn_implementation="eager")
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab, n_positions=MAX_POSITIONS, n_embd=D_MODEL, n_layer=N_LAYERS,
            n_head=N_HEADS, n_inner=4 * D_MODEL, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **ids,
        )
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
            num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **ids,
        )
    if name == "tiny-neox":
        return GPTNeoXConfig(
            vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=4 * D_MODEL,
            num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
            max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25, hidden_dropout=0.0,
            attention_dropout=0.0, tie_word_embeddings=False, **ids,
        )
    raise FeatoptError(f"Unknown tiny model {name!r}: the built-in ones are {', '.join(TINY_MODELS)}.")


_CLASSES = {"tiny-gpt2": GPT2LMHeadModel, "tiny-llama": LlamaForCausalLM, "tiny-neox": GPTNeoXForCausalLM}


def build_tiny(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init tiny model (float32, eval mode) and its tokenizer.

    The same ``(name, seed)`` gives bitwise the same weights. The torch seed is mixed with the
    name so the three models, and a re-init of one under ``torch.manual_seed(seed)`` (what
    ``load_model(name, untrained=True, seed=seed)`` does), never share a random stream.
    """
    tok = tiny_tokenizer()
    config = _config(name, len(tok), tok.eos_token_id)
    torch_seed = zlib.crc32(f"featopt:{name}:{seed}".encode())
    # fork_rng: seeding must not reset the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        model = _CLASSES[name](config)
    return model.to(torch.float32).eval(), tok
