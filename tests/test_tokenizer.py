"""ChatTokenizer's contract: construction paths, errors, batch behaviour.
Expected ids and special tokens come from the `tokenizers` crate reading the
same files (the reference), not from constants."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from rollstream import ChatFormatError, ChatTokenizer, TemplateError, TokenizerError

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hello_ids(tok: ChatTokenizer, reference: Tokenizer) -> list[int]:
    """The reference's ids of the rendered HELLO prompt."""
    ids: list[int] = reference.encode(tok.render_chat_template(HELLO), add_special_tokens=False).ids
    return ids


def test_from_pretrained_dir_and_file(
    tok: ChatTokenizer, tiny_model_dir: Path, reference: Tokenizer, hello_ids: list[int]
) -> None:
    assert tok.apply_chat_template(HELLO) == hello_ids
    assert tok.has_fast_path
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok.eos_token == config["eos_token"]
    assert tok.eos_token_id == reference.token_to_id(config["eos_token"])
    assert tok.pad_token_id == reference.token_to_id(config["pad_token"])
    assert (tok.bos_token_id is None) == (config["bos_token"] is None)
    assert tok.vocab_size == reference.get_vocab_size()
    bare = ChatTokenizer.from_pretrained(tiny_model_dir / "tokenizer.json")
    assert bare.encode("Hello!") == reference.encode("Hello!", add_special_tokens=False).ids


def test_render_and_generation_prompt(tok: ChatTokenizer, hello_ids: list[int]) -> None:
    text = tok.render_chat_template(HELLO)
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.render_chat_template(HELLO, add_generation_prompt=False).endswith("assistant\n")
    assert tok.encode(text) == hello_ids
    assert tok.decode(hello_ids) == text
    assert tok.decode(np.array(hello_ids)) == text


def test_continue_final_message(tok: ChatTokenizer) -> None:
    conv = [*HELLO, {"role": "assistant", "content": "I am"}]
    text = tok.render_chat_template(conv, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nI am")
    with pytest.raises(ChatFormatError, match="not compatible"):
        tok.render_chat_template(conv, add_generation_prompt=True, continue_final_message=True)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "usr", "content": "hi"}], "unknown role 'usr'"),
        ([{"role": "user", "content": 5}], "must be a string, a list of parts or None"),
        ([{"role": "user", "content": ["text"]}], "must be a dict part"),
        ([{"content": "hi"}], "needs a string 'role'"),
        (["hi"], "messages[0] must be a dict"),
        ({"role": "user"}, "must be a list"),
    ],
)
def test_malformed_conversations_raise_clear_errors(
    tok: ChatTokenizer, messages: object, fragment: str
) -> None:
    with pytest.raises(ChatFormatError) as info:
        tok.apply_chat_template(messages)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_extra_roles(tiny_model_dir: Path) -> None:
    tok = ChatTokenizer.from_pretrained(tiny_model_dir, extra_roles=["observation"])
    assert tok.render_chat_template([{"role": "observation", "content": "x"}]).startswith(
        "<|im_start|>observation"
    )


def test_unconvertible_python_objects_name_their_path(tok: ChatTokenizer) -> None:
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] has type object"):
        tok.apply_chat_template([{"role": "user", "content": object()}])


def test_template_errors_name_the_line(tiny_model_dir: Path) -> None:
    json_text = (tiny_model_dir / "tokenizer.json").read_text()
    raising = ChatTokenizer(
        json_text, chat_template="{% for m in messages %}\n{{ raise_exception('no ' + m.role) }}{% endfor %}"
    )
    with pytest.raises(TemplateError) as info:
        raising.apply_chat_template(HELLO)
    err = info.value
    assert err.raised
    assert err.template_message == "no user"
    assert err.line == 2
    assert "line 2" in str(err)
    assert pickle.loads(pickle.dumps(err)).line == 2

    with pytest.raises(TemplateError) as info:
        ChatTokenizer(json_text, chat_template="ok\n{% for %}")
    assert info.value.line == 2
    assert not info.value.raised

    attr = ChatTokenizer(json_text, chat_template="{{ messages[0].missing.deeper }}")
    with pytest.raises(TemplateError, match="undefined"):
        attr.apply_chat_template(HELLO)

    with pytest.raises(ChatFormatError, match="no chat template"):
        ChatTokenizer(json_text).apply_chat_template(HELLO)


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        ChatTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match=r"invalid tokenizer\.json"):
        ChatTokenizer('{"model": 1}')
    with pytest.raises(TypeError):
        ChatTokenizer(b"{}")  # type: ignore[arg-type]


def test_batches_and_errors_name_the_conversation(tok: ChatTokenizer) -> None:
    convs = [HELLO, [{"role": "user", "content": "second"}]]
    out = tok.encode_chats(convs)
    assert [o.tolist() for o in out] == [tok.apply_chat_template(c) for c in convs]
    with pytest.raises(ChatFormatError, match="conversation 1"):
        tok.encode_chats([HELLO, [{"role": "bad", "content": "x"}]])
    texts = tok.encode_batch(["a b", "c"])
    assert [t.tolist() for t in texts] == [tok.encode("a b"), tok.encode("c")]


def test_coerce_accepts_all_forms(tok: ChatTokenizer, tiny_model_dir: Path, hello_ids: list[int]) -> None:
    assert ChatTokenizer.coerce(tok) is tok
    assert ChatTokenizer.coerce(str(tiny_model_dir)).apply_chat_template(HELLO) == hello_ids
    raw = ChatTokenizer.coerce(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")))
    assert raw.encode("Hello!") == tok.encode("Hello!")
    with pytest.raises(TypeError, match="cannot build a ChatTokenizer"):
        ChatTokenizer.coerce(42)


def test_batch_errors_keep_every_template_error_attribute(tiny_model_dir: Path) -> None:
    json_text = (tiny_model_dir / "tokenizer.json").read_text()
    tok = ChatTokenizer(
        json_text,
        chat_template="{% if messages[0].content == 'bad' %}\n{{ raise_exception('refused') }}{% endif %}ok",
    )
    with pytest.raises(TemplateError) as info:
        tok.encode_chats([HELLO, [{"role": "user", "content": "bad"}]])
    err = info.value
    assert str(err).startswith("conversation 1: ")
    assert (err.template_message, err.line, err.raised) == ("refused", 2, True)
    assert err.source_line is not None
    assert "raise_exception" in err.source_line
    back = pickle.loads(pickle.dumps(err))
    assert (back.line, back.source_line, back.raised) == (err.line, err.source_line, True)
