"""ChatTokenizer's contract: construction paths, errors, batch behaviour."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from rollstream import ChatFormatError, ChatTokenizer, TemplateError, TokenizerError

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
HELLO_IDS = [151644, 872, 198, 9707, 0, 2585, 525, 498, 3351, 30, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_model_dir)


def test_from_pretrained_dir_and_file(tok: ChatTokenizer, tiny_model_dir: Path) -> None:
    assert tok.apply_chat_template(HELLO) == HELLO_IDS
    assert tok.has_fast_path
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == 151645
    assert tok.pad_token_id == 151643
    assert tok.bos_token_id is None
    assert tok.vocab_size == 151669
    bare = ChatTokenizer.from_pretrained(tiny_model_dir / "tokenizer.json")
    assert bare.encode("Hello!") == [9707, 0]


def test_render_and_generation_prompt(tok: ChatTokenizer) -> None:
    text = tok.render_chat_template(HELLO)
    assert text.endswith("<|im_start|>assistant\n")
    assert not tok.render_chat_template(HELLO, add_generation_prompt=False).endswith("assistant\n")
    assert tok.encode(text) == HELLO_IDS
    assert tok.decode(HELLO_IDS) == text
    assert tok.decode(np.array(HELLO_IDS)) == text


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
    assert out[0].tolist() == HELLO_IDS
    assert len(out) == 2
    with pytest.raises(ChatFormatError, match="conversation 1"):
        tok.encode_chats([HELLO, [{"role": "bad", "content": "x"}]])
    texts = tok.encode_batch(["a b", "c"])
    assert [t.tolist() for t in texts] == [tok.encode("a b"), tok.encode("c")]


def test_coerce_accepts_all_forms(tok: ChatTokenizer, tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    assert ChatTokenizer.coerce(tok) is tok
    assert ChatTokenizer.coerce(str(tiny_model_dir)).apply_chat_template(HELLO) == HELLO_IDS
    raw = ChatTokenizer.coerce(Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")))
    assert raw.encode("Hello!") == [9707, 0]
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
