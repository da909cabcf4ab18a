"""Character-level tokenizer for the tiny models this project trains from scratch.

Built in-process with the `tokenizers` library (nothing is downloaded): one token per character,
plus chat markers and the `<think>` / `<answer>` tags as single tokens. The chat template marks each assistant
reply (and its end-of-sequence token) with `{% generation %}`, so TRL's `assistant_only_loss` trains on replies only.
"""

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
CHARACTERS = string.digits + string.ascii_letters + " \n" + string.punctuation

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the deterministic character-level tokenizer (same ids on every call and machine).

    Ids: special tokens first (pad=0, bos=1, eos=2, unk=3, roles), then the tags, then the characters;
    any character outside the vocabulary maps to `<|unk|>`.
    """
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    vocab = {token: i for i, token in enumerate([*specials, *TAG_TOKENS, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
