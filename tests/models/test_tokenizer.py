"""The torch-free tokenizer against transformers' own, on the tiny model's tokenizer, and the
converted-copy cache."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.models import ModelNotFound, ModelSource, Tokenizer, TokenizerError, load_tokenizer
from edgellm.models import cache
from edgellm.models.catalog import parse_model_arg

TEXTS = ["hello world", " leading space", "Ünïcödé naïve café", "日本語のテキスト 🎉🚀",
         "a\n\nb  c\t", "<|im_start|>user\nhi<|im_end|>", ""]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_dir(tiny_model_dir, "tiny"), transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(pair, text):
    ours, theirs = pair
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    ids = theirs(text).input_ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=40)),
                min_size=1, max_size=5),
       st.booleans())  # fmt: skip
def test_chat_template_renders_and_encodes_as_transformers(pair, turns, generation_prompt):
    ours, theirs = pair
    messages = [{"role": r, "content": c} for r, c in turns]
    assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == \
        theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == \
        theirs.apply_chat_template(messages, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": "king", "content": "x"}],
                                      [{"role": "user", "content": 3}], [["user", "x"]]])  # fmt: skip
def test_malformed_messages_are_refused(pair, messages):
    with pytest.raises(TokenizerError):
        pair[0].encode_chat(messages)


def test_a_template_that_raises_is_a_tokenizer_error(tiny_model_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    tok = Tokenizer.from_dir(str(tmp_path / "m"))
    assert tok.render_chat([{"role": "user", "content": "a"}]) == "x"
    with pytest.raises(TokenizerError, match="user first"):
        tok.render_chat([{"role": "assistant", "content": "a"}])


def test_detokenizer_never_splits_a_character(pair):
    ours, _ = pair
    text = "日本語 🎉 naïve"
    detok = ours.detokenizer()
    pieces = [detok.push(t) for t in ours.encode(text, add_special_tokens=False)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_model_sources(tiny_model_dir, tmp_path):
    assert ModelSource("tiny", tiny_model_dir).directory == tiny_model_dir
    assert parse_model_arg(f"x={tiny_model_dir}").name == "x"
    assert parse_model_arg(tiny_model_dir).name == os.path.basename(tiny_model_dir)
    with pytest.raises(ModelNotFound):
        ModelSource("gone", str(tmp_path / "nothing"))
    with pytest.raises(ModelNotFound):
        ModelSource("empty", str(tmp_path))
    with pytest.raises(ValueError):
        ModelSource("bad name!", tiny_model_dir)
    assert load_tokenizer(ModelSource("tiny", tiny_model_dir)).vocab_size > 256


def test_digest_is_memoised_and_follows_the_file(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    f = tmp_path / "model.gguf"
    f.write_bytes(b"a" * 1000)
    first = cache.file_digest(str(f), str(root))
    assert (root / "digests.json").exists()
    assert cache.file_digest(str(f), str(root)) == first
    f.write_bytes(b"b" * 1001)
    assert cache.file_digest(str(f), str(root)) != first
    monkeypatch.setenv("EDGELLM_CACHE_DIR", str(root))
    assert cache.converted_dir(str(f)).startswith(str(root) + "/model-")
    assert cache.converted_dir(str(f)).endswith(f"-tf{cache.transformers_version()}")


def test_ensure_part_writes_once_and_atomically(tmp_path):
    calls = []

    def write(tmp):
        calls.append(tmp)
        with open(os.path.join(tmp, "weights"), "w") as fh:
            fh.write("w")

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.ensure_part(str(tmp_path), "model", write)))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {str(tmp_path / "model")}
    assert (tmp_path / "model" / "weights").read_text() == "w"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left
    racers = len(calls)
    assert 1 <= racers <= 4  # racers may each have written once; one copy won
    cache.ensure_part(str(tmp_path), "model", write)
    assert len(calls) == racers  # once it exists, nothing is written again


def test_a_failed_conversion_leaves_nothing(tmp_path):
    def broken(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        cache.ensure_part(str(tmp_path), "tokenizer", broken)
    assert os.listdir(tmp_path) == []
