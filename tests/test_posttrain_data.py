"""Post-training data: record shapes (data/conversations.py), chat tokens and loss masks
(objectives/chat_tokens.py, checked against transformers' apply_chat_template), packed rows
(objectives/sft.py) and the task mixture (objectives/tasks.py)."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.conversations import RecordError, parse_transcript, read_records, to_messages, to_pair
from model.loss import IGNORE_INDEX
from objectives.chat_tokens import DEFAULT_TEMPLATE, ChatTokenizer
from objectives.sft import SFTLoader, pack, rows_to_batch, to_example
from objectives.tasks import holdout_split
from tests.helpers import small_tokenizer, tiny_model

WORDS = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs near rivers of "
         "gold and silver light; why? because tomorrow never comes, said Ada").split()


def random_text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "?", "!\n", ""])


def random_conversation(rng: random.Random, system: bool | None = None) -> list[dict]:
    messages = []
    if system if system is not None else rng.random() < 0.5:
        messages.append({"role": "system", "content": random_text(rng, rng.randint(2, 8))})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": random_text(rng, rng.randint(1, 12))})
        messages.append({"role": "assistant", "content": random_text(rng, rng.randint(0, 12))})
    return messages


# --- record shapes ----------------------------------------------------------------------------


def test_hh_rlhf_transcripts_become_a_prompt_and_two_answers():
    chosen = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: no."
    rejected = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: ok!"
    pair = to_pair({"chosen": chosen, "rejected": rejected}, "x:1")
    assert pair.prompt == [{"role": "user", "content": "hi there"},
                           {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "tell me a joke"}]
    assert pair.chosen == [{"role": "assistant", "content": "no."}]
    assert pair.rejected == [{"role": "assistant", "content": "ok!"}]
    assert to_messages({"chosen": chosen, "rejected": rejected}, "x:1") == pair.prompt + pair.chosen
    # Split before the last turn (5 of the real file's pairs): the prompt ends at a user turn.
    early = "\n\nHuman: hi there\n\nAssistant: go away\n\nHuman: why?\n\nAssistant: sorry"
    pair = to_pair({"chosen": chosen, "rejected": early}, "x:2")
    assert [m["role"] for m in pair.prompt] == ["user"]
    assert [m["content"] for m in pair.rejected] == ["go away", "why?", "sorry"]


def test_the_usual_jsonl_shapes(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "c", "completion": "d"},
        {"prompt": "e", "chosen": "f", "rejected": "g"},
        {"instruction": "h", "instances": [{"input": "i", "output": "j"}]},
        {"instruction": "k", "input": "", "output": "l"},
    ]
    path = tmp_path / "mixed.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    got = [to_messages(r, w) for w, r in read_records(str(path))]
    texts = [[m["content"] for m in conv] for conv in got]
    assert texts == [["a", "b"], ["c", "d"], ["e", "f"], ["h\n\ni", "j"], ["k", "l"]]
    assert [m["role"] for m in got[3]] == ["user", "assistant"]
    assert to_pair(records[2], "w").rejected == [{"role": "assistant", "content": "g"}]


def test_bad_records_name_the_file_line_and_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"text": "x"}\n')
    rows = list(read_records(str(path)))
    with pytest.raises(RecordError, match=r"bad.jsonl:2: fields \['text'\]"):
        to_messages(rows[1][1], rows[1][0])
    with pytest.raises(RecordError, match=r"messages\[0\]"):
        to_messages({"messages": [{"role": "robot", "content": "a"}]}, "f:3")
    path.write_text('{"messages": [\n')
    with pytest.raises(RecordError, match="bad.jsonl:1: not valid JSON"):
        list(read_records(str(path)))
    with pytest.raises(RecordError, match="transcript"):
        parse_transcript("no markers here", "f:9")


def test_holdout_is_fixed_by_the_data_not_the_run():
    records = list(range(50))
    train, held = holdout_split(records, 7)
    assert holdout_split(records, 7) == (train, held)
    assert len(held) == 7 and sorted(train + held) == records


# --- chat tokens and loss masks ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_small(tmp_path_factory):
    """Our small tokenizer as a transformers tokenizer with the default chat template."""
    import transformers

    from data.hf_tokenizer import save_hf_tokenizer

    out = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(small_tokenizer().encoding, out, model_max_length=512)
    (out / "chat_template.jinja").write_text(DEFAULT_TEMPLATE)
    return transformers.AutoTokenizer.from_pretrained(out)


def test_default_template_tokens_and_mask_equal_transformers(hf_small, seed):
    """Token ids and assistant masks equal apply_chat_template(return_assistant_tokens_mask)."""
    rng = random.Random(seed)
    chat = ChatTokenizer(small_tokenizer(), DEFAULT_TEMPLATE)
    for i in range(20):
        messages = random_conversation(rng, system=i % 2 == 0)
        for gen in (False, True):
            ids = chat.encode_text(chat.render(messages, add_generation_prompt=gen))
            want = hf_small.apply_chat_template(messages, add_generation_prompt=gen,
                                                tokenize=True, return_dict=True)
            assert ids == list(want["input_ids"]), messages
        got_ids, mask = chat.encode(messages)
        want = hf_small.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert got_ids == list(want["input_ids"])
        assert [int(m) for m in mask] == list(want["assistant_masks"]), messages


SMOL_LIKE = (  # SmolLM2's template with our end-of-text token: no {% generation %} tags
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|endoftext|>system\nYou are helpful<|endoftext|>\n' }}{% endif %}"
    "{{'<|endoftext|>' + message['role'] + '\n' + message['content'] + '<|endoftext|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|endoftext|>assistant\n' }}{% endif %}"
)
SMOL_TAGGED = SMOL_LIKE.replace(
    "{{'<|endoftext|>' + message['role'] + '\n' + message['content'] + '<|endoftext|>' + '\n'}}",
    "{{'<|endoftext|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|endoftext|>' }}{% endif %}{{ '\n' }}",
)


def test_untagged_template_mask_equals_the_tagged_one(seed):
    """Without {% generation %} tags the assistant's tokens come from rendering prefixes: the
    same mask as the tagged template (answer + end-of-turn token), the same ids."""
    rng = random.Random(seed)
    plain = ChatTokenizer(small_tokenizer(), SMOL_LIKE)
    tagged = ChatTokenizer(small_tokenizer(), SMOL_TAGGED)
    assert not plain.tagged and tagged.tagged
    for _ in range(20):
        messages = random_conversation(rng)
        assert plain.encode(messages) == tagged.encode(messages)


def test_only_assistant_tokens_carry_loss_and_user_tokens_change_no_target(seed):
    """The labelled tokens are exactly the assistant answers, each with its end-of-turn token;
    a changed user token (or a whole changed user turn) leaves every target as it was."""
    rng = random.Random(seed)
    tok = small_tokenizer()
    chat = ChatTokenizer(tok, DEFAULT_TEMPLATE)
    for _ in range(10):
        messages = random_conversation(rng)
        ids, mask = chat.encode(messages)
        x, labels = to_example(ids, mask, capacity=10_000)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        labelled = [int(t) for t in labels if t != IGNORE_INDEX]
        assert tok.decode(labelled) == "".join(a + "<|endoftext|>" for a in answers)
        # A user token changed in the input ids: the targets (labels shifted) stay the same.
        user = [i for i, m in enumerate(mask) if not m and i > 0]
        pos = rng.choice(user)
        changed = list(ids)
        changed[pos] = (changed[pos] + 1) % tok.n_vocab
        _, labels2 = to_example(changed, mask, capacity=10_000)
        assert np.array_equal(labels, labels2)
        # A changed user turn re-rendered: the targets with loss are the same tokens.
        other = [dict(m) for m in messages]
        first_user = next(m for m in other if m["role"] == "user")
        first_user["content"] += " and more words"
        _, labels3 = to_example(*chat.encode(other), capacity=10_000)
        assert [t for t in labels3 if t != IGNORE_INDEX] == labelled


def test_prompt_start_masks_only_the_completion(seed):
    rng = random.Random(seed)
    chat = ChatTokenizer(small_tokenizer(), DEFAULT_TEMPLATE)
    messages = random_conversation(rng)
    n = len(messages) - 1  # the last assistant turn is the completion
    ids, mask = chat.encode(messages, start=n)
    labelled = [i for i, m in zip(ids, mask) if m]
    assert small_tokenizer().decode(labelled) == messages[-1]["content"] + "<|endoftext|>"


# --- packing and the mixture ------------------------------------------------------------------


def _examples(rng: random.Random, n: int, capacity: int) -> list:
    chat = ChatTokenizer(small_tokenizer(), DEFAULT_TEMPLATE)
    out = [to_example(*chat.encode(random_conversation(rng)), capacity) for _ in range(n)]
    return [e for e in out if e is not None]


def test_a_packed_row_computes_each_conversation_alone(seed, one_thread):
    """Document masking: the loss of a packed row is the token-weighted loss of its
    conversations run one by one (RoPE is relative, so their positions do not matter)."""
    rng = random.Random(seed)
    model = tiny_model(small_tokenizer().n_vocab, seed=seed % 100)
    examples = _examples(rng, 6, capacity=400)
    rows = pack(examples, 401, packing=True)
    assert any(len(r) > 1 for r in rows)
    batch = rows_to_batch(rows[:1], 400, pad_id=0, packing=True)
    packed = F.cross_entropy(model(batch.inputs, doc_ids=batch.doc_ids)[0], batch.targets[0],
                             ignore_index=IGNORE_INDEX, reduction="sum")
    alone = 0.0
    for x, y in rows[0]:
        logits = model(torch.from_numpy(x[None, :-1]))[0]
        alone += F.cross_entropy(logits, torch.from_numpy(y[1:]), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def _loader(tasks, world=1, rank=0, **kw):
    return SFTLoader(tasks, {"a": 3.0, "b": 1.0}, seq_len=64, batch_size=8, micro_batch_size=2,
                     rank=rank, world_size=world, seed=5, **kw)


def test_sft_loader_is_world_size_independent_resumable_and_weighted(seed):
    rng = random.Random(seed)
    tasks = {"a": _examples(rng, 30, 65), "b": _examples(rng, 10, 65)}
    one = _loader(tasks)
    two = [_loader(tasks, world=2, rank=r) for r in range(2)]
    for _ in range(3):
        whole = one.next_step()  # 4 micro-batches of 2 rows
        parts = [loader.next_step() for loader in two]  # 2 micro-batches each
        got = [parts[r][m] for m in range(2) for r in range(2)]
        for a, b in zip(whole, got):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.doc_ids, b.doc_ids)
    state = one.state_dict()
    resumed = _loader(tasks)
    resumed.load_state_dict(state)
    for a, b in zip(one.next_step(), resumed.next_step()):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    for _ in range(40):
        one.next_step()
    share = one.metrics()["mixture/a"]
    assert 0.65 < share < 0.85, share  # weight 3 : 1 -> 0.75 of the conversations
    with pytest.raises(ValueError, match="same posttrain.data"):
        SFTLoader({"a": tasks["a"]}, {"a": 1.0}, 64, 8, 2).load_state_dict(state)


def test_padded_rows_hold_one_conversation(seed):
    rng = random.Random(seed)
    tasks = {"a": _examples(rng, 12, 65), "b": _examples(rng, 4, 65)}
    batch = _loader(tasks, packing=False).next_step()[0]
    assert batch.doc_ids is None
    for row in batch.targets:
        valid = (row != IGNORE_INDEX).nonzero()
        assert len(valid) > 0


# --- configuration -----------------------------------------------------------------------------


def test_posttraining_config_errors_name_the_field(tmp_path):
    from job_config import ConfigError, load_config
    from objectives import resolve_config

    with pytest.raises(ConfigError, match="needs posttrain.data"):
        load_config("configs/tiny.toml", ["--train.objective=sft"])
    with pytest.raises(ConfigError, match="train.objective = 'rl'"):
        load_config("configs/tiny.toml", ["--train.objective=rl"])
    with pytest.raises(ConfigError, match="lora.targets"):
        load_config("configs/tiny.toml", ['--lora.targets=["wz"]'])
    with pytest.raises(ConfigError, match="native engine"):
        load_config("configs/tiny.toml", ["--lora.rank=4", "--parallel.engine=deepspeed"])
    with pytest.raises(ConfigError, match="posttrain.beta"):
        load_config("configs/tiny.toml", ["--posttrain.beta=0"])
    cfg = load_config("configs/tiny.toml", ["--train.objective=dpo", '--posttrain.data=["x"]'])
    with pytest.raises(ConfigError, match="set checkpoint.init_from"):
        resolve_config(cfg)
    cfg.checkpoint.init_from = str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_config(cfg)
