"""SmolLM2-135M-Instruct's own chat template through our renderer and tokenizer: the token ids
of 50 conversations equal transformers' apply_chat_template, and the assistant tokens we
train on equal transformers' assistant mask (its template with {% generation %} tags added)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from model.loss import IGNORE_INDEX
from objectives.chat_tokens import ChatTokenizer
from objectives.sft import to_example

TEXT = ("I can't help with that , but here is why : 42 % of the time it works ; "
        "é ü ñ “quoted” — dash … 🙂 naïve café\n\n1. first\n2. second\n  indented code() {}").split(" ")


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(TEXT) for _ in range(n)).strip()


def conversation(rng: random.Random, system: bool, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": text(rng, rng.randint(3, 10))}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": text(rng, rng.randint(1, 25))})
        messages.append({"role": "assistant", "content": text(rng, rng.randint(1, 40))})
    return messages


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    import transformers

    from data.tokenizer import load_tokenizer

    ours = load_tokenizer(f"hf:{smollm2_dir}")
    return ours, transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def tagged(template: str) -> str:
    """SmolLM2's template with the assistant's answer and end-of-turn in a generation block."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in template, "SmolLM2's template changed; update the tagged copy"
    return template.replace(plain, (
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"))


def test_smollm2_chat_ids_and_assistant_mask_equal_transformers(smol, seed):
    ours, hf = smol
    assert ours.chat_template and ours.chat_template == hf.chat_template
    chat = ChatTokenizer(ours, ours.chat_template)
    rng = random.Random(seed)
    for i in range(50):  # with / without a system turn, 1-3 turns, generation prompt on / off
        messages = conversation(rng, system=i % 2 == 0, turns=1 + i % 3)
        gen = i % 4 < 2
        if gen:
            messages = messages[:-1]  # a prompt awaiting the assistant's answer
        ids = chat.encode_text(chat.render(messages, add_generation_prompt=gen))
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                      return_dict=True)["input_ids"]
        assert ids == list(want), (i, messages)
        if gen:
            continue
        got_ids, mask = chat.encode(messages)  # the untagged template: spans from prefixes
        want = hf.apply_chat_template(messages, chat_template=tagged(hf.chat_template),
                                      tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert got_ids == list(want["input_ids"])
        assert [int(m) for m in mask] == list(want["assistant_masks"]), (i, messages)


def test_smollm2_only_the_answers_carry_loss(smol, seed):
    ours, _ = smol
    chat = ChatTokenizer(ours, ours.chat_template)
    rng = random.Random(seed)
    for _ in range(5):
        messages = conversation(rng, system=False, turns=3)
        ids, mask = chat.encode(messages)
        _, labels = to_example(ids, mask, capacity=100_000)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert ours.decode([t for t in labels if t != IGNORE_INDEX]) == \
            "".join(a + "<|im_end|>" for a in answers)
        user = [i for i, m in enumerate(mask) if not m and i > 0]
        changed = list(ids)
        for pos in rng.sample(user, 5):
            changed[pos] = rng.randrange(ours.n_vocab)
        assert np.array_equal(to_example(changed, mask, capacity=100_000)[1], labels)
