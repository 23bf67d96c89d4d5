"""Conversations -> token ids and the mask of the tokens that carry the loss (the assistant's).

    chat = ChatTokenizer(tokenizer, template="")            # the tokenizer's own template
    ids, mask = chat.encode(messages)                         # mask[i]: token i is assistant text
    ids, mask = chat.encode(prompt + chosen, start=len(prompt))   # only what follows the prompt

The text is rendered by data/chat.py exactly as transformers' `apply_chat_template` renders it
and tokenized as transformers tokenizes it (special-token strings become their ids, no other
special tokens added: the template alone places BOS), so `ids` equal transformers' token ids.

Which characters are the assistant's: with `{% generation %}` blocks in the template, what is
inside them (transformers' `return_assistant_tokens_mask`); without them (most templates, e.g.
SmolLM2's), for each assistant message i the text that rendering messages[: i + 1] adds to
messages[: i] rendered with the generation prompt, trailing whitespace dropped: the answer and
its end-of-turn token, which is exactly what the model must generate after the prompt. A
template whose renderings are not prefixes of each other stops with an error asking for
`{% generation %}` tags. A token is the assistant's when its bytes overlap those characters.

DEFAULT_TEMPLATE is the chat format of our own models (whose tokenizers have one special
token, <|endoftext|>): each turn is a role line then the text; an assistant turn ends with
<|endoftext|> (which stops generation), other turns with a newline; the conversation starts
with <|endoftext|>, as every pretraining document does:

    <|endoftext|><|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>
    Hello.<|endoftext|>
"""

from __future__ import annotations

import re
from pathlib import Path

from data.chat import ChatTemplateError, render_chat
from data.tokenizer import EOT

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def resolve_template(tokenizer, spec: str) -> str:
    """posttrain.chat_template: "" (the tokenizer's own, else DEFAULT_TEMPLATE), "default",
    or a .jinja file."""
    if spec == "":
        return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
    if spec == "default":
        return DEFAULT_TEMPLATE
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"posttrain.chat_template = {spec!r}: expected '', 'default' or "
                                "a .jinja file")
    return path.read_text(encoding="utf-8")


class ChatTokenizer:
    """A tokenizer (data/tokenizer.py interface) and a chat template, for training data."""

    def __init__(self, tokenizer, template: str):
        self.tok, self.template = tokenizer, template
        self.tagged = "{% generation %}" in re.sub(r"{%-?\s*generation\s*-?%}", "{% generation %}",
                                                   template)
        specials = dict(tokenizer.special_tokens)
        # Template variables the tokenizer does not name itself (ours: bos = eos = end-of-text).
        named = getattr(tokenizer, "special_token_strings", {}) or {}
        self.variables = {k: EOT for k in ("bos_token", "eos_token") if k not in named}
        # transformers turns special-token strings in the rendered text into their ids;
        # Hugging Face tokenizers (data/hf_tokenizer.py) encode so already, ours as plain text.
        probe = next(iter(specials))
        self.split = (re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
                      if tokenizer.encode(probe) != [specials[probe]] else None)
        self.specials = specials
        # Each id's bytes, to find which characters a token covers.
        self.token_bytes = {i: b for b, i in tokenizer.mergeable_ranks.items()}
        for text, i in {**specials, **getattr(tokenizer, "added_tokens", {})}.items():
            self.token_bytes[i] = text.encode()

    # --- rendering ----------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kw):
        return render_chat(self.tok, messages, add_generation_prompt, template=self.template,
                           **self.variables, **kw)

    def encode_text(self, text: str) -> list[int]:
        """Rendered text -> ids as transformers does (add_special_tokens=False)."""
        if self.split is None:
            return self.tok.encode(text)
        ids, pos = [], 0
        for m in self.split.finditer(text):
            ids += self.tok.encode(text[pos : m.start()]) if m.start() > pos else []
            ids.append(self.specials[m.group()])
            pos = m.end()
        return ids + (self.tok.encode(text[pos:]) if pos < len(text) else [])

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character spans of the assistant's text])."""
        if self.tagged:
            return self.render(messages, with_spans=True)
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ChatTemplateError(
                    "the chat template renders a conversation's turns differently from the "
                    "conversation's prefixes, so the assistant's tokens cannot be found; add "
                    "{% generation %}...{% endgeneration %} around the assistant's text"
                )
            spans.append((len(before), max(len(before), len(upto.rstrip()))))
        return text, spans

    # --- tokens -------------------------------------------------------------------------------

    def encode(self, messages: list[dict], start: int = 0) -> tuple[list[int], list[bool]]:
        """(ids, mask): mask[i] is True for tokens of assistant text in messages[start:]."""
        text, spans = self.assistant_spans(messages)
        if start:
            prompt = self.render(messages[:start], add_generation_prompt=True)
            if not text.startswith(prompt):
                raise ChatTemplateError("the chat template renders the prompt differently "
                                        "inside the whole conversation")
            spans = [(max(a, len(prompt)), b) for a, b in spans if b > len(prompt)]
        ids = self.encode_text(text)
        # Character spans -> byte spans; token k covers bytes [offsets[k], offsets[k + 1]).
        data = text.encode()
        byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
        offsets, pos = [], 0
        for i in ids:
            offsets.append(pos)
            pos += len(self.token_bytes[i])
        if pos != len(data):
            raise ChatTemplateError(f"tokenizer {self.tok.name}: token bytes do not add up to "
                                    "the text (a normalizing tokenizer?); cannot place the mask")
        offsets.append(pos)
        mask = [False] * len(ids)
        k = 0
        for a, b in byte_spans:  # spans are in order and disjoint
            while k < len(ids) and offsets[k + 1] <= a:
                k += 1
            j = k
            while j < len(ids) and offsets[j] < b:
                mask[j] = True
                j += 1
        return ids, mask
