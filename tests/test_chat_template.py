"""Chat templates render in a sandbox with the Hugging Face helper variables."""

from __future__ import annotations

import pytest

from jaxllm.chat_template import read_template_file, render_chat
from jaxllm.errors import TokenizerError

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_renders_messages_bos_and_generation_prompt():
    t = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_chat(t, MSGS, bos_token="<s>") == "<s>[system]Be brief.[user]Hi[assistant]"
    assert render_chat(t, MSGS, bos_token="<s>", add_generation_prompt=False) == "<s>[system]Be brief.[user]Hi"


def test_helpers_raise_exception_strftime_tools_tojson():
    t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    with pytest.raises(TokenizerError, match="first must be user"):
        render_chat(t, MSGS)
    assert len(render_chat("{{ strftime_now('%Y-%m-%d') }}", MSGS)) == 10
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render_chat("{{ tools | tojson }}", MSGS, tools=tools) == '[{"type": "function", "function": {"name": "f"}}]'


def test_sandbox_blocks_unsafe_access():
    with pytest.raises(TokenizerError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", MSGS)


def test_bad_templates_and_messages_give_typed_errors(tmp_path):
    with pytest.raises(TokenizerError):
        render_chat("{% for %}", MSGS)
    with pytest.raises(TokenizerError):
        render_chat(None, MSGS)
    with pytest.raises(TokenizerError):
        render_chat("x", [{"content": "no role"}])
    with pytest.raises(TokenizerError):
        render_chat("x", [])
    with pytest.raises(TokenizerError):
        read_template_file(tmp_path / "missing.jinja")
    f = tmp_path / "t.jinja"
    f.write_text("T{{ messages|length }}")
    assert render_chat(read_template_file(f), MSGS) == "T2"


def test_template_source_order(tiny_models, tmp_path):
    """--chat-template beats chat_template.jinja, which beats tokenizer_config.json."""
    import shutil

    from jaxllm.loading.load import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama"][0], folder)
    assert "<|assistant|>" in load_model(folder, progress=False).tokenizer.chat_template
    (folder / "chat_template.jinja").write_text("JINJA")
    assert load_model(folder, progress=False).tokenizer.chat_template == "JINJA"
    explicit = tmp_path / "explicit.jinja"
    explicit.write_text("EXPLICIT")
    assert load_model(folder, chat_template=explicit, progress=False).tokenizer.chat_template == "EXPLICIT"
