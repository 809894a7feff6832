"""Chat templates are data from a model directory, never code: rendered in jinja2's sandbox."""

import json

import pytest

from hyla.data.tokenizer import ChatTemplate, load_chat_template
from hyla.errors import DataError, RequestError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
# ChatML as chat models ship it (trim_blocks / lstrip_blocks as transformers renders it).
CHATML = """{% for message in messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_chat_model_template_renders_as_transformers_would():
    expected = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ChatTemplate(CHATML).render(MESSAGES) == expected
    assert ChatTemplate(None).render(MESSAGES) == "system: be brief\nuser: hi\nassistant:"


@pytest.mark.parametrize(
    "exploit",
    [
        "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        "{{ c(['touch', '{marker}']) }}{% endif %}{% endfor %}",
        "{{ messages.append({'role': 'x'}) }}{{ self.__init__.__globals__.__builtins__.open('{marker}', 'w') }}",
    ],
)
def test_a_template_cannot_run_code(tmp_path, exploit):
    marker = tmp_path / "pwned"
    template = ChatTemplate(exploit.replace("{marker}", str(marker)))
    with pytest.raises(RequestError, match="chat template failed") as e:
        template.render(MESSAGES)
    assert e.value.param == "messages"
    assert not marker.exists()


def test_raise_exception_refuses_the_conversation():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(RequestError, match="refused them: first must be user"):
        template.render(MESSAGES)
    assert template.render(MESSAGES[1:]) == ""


def test_a_malformed_template_fails_when_loaded():
    with pytest.raises(DataError, match="the chat_template of m is not a valid Jinja template"):
        ChatTemplate("{% for m in messages %}{{ m.content }}", "the chat_template of m")


def test_template_files(tmp_path):
    file = tmp_path / "tokenizer_config.json"
    assert load_chat_template(tmp_path) is None
    file.write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert load_chat_template(tmp_path) == "D"
    file.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(DataError, match="without a template named 'default'"):
        load_chat_template(tmp_path)
    for bad, match in (("[1, 2]", "must hold a JSON object"), ('{"chat_template": 3}', "must be a string"),
                       ("{", "cannot read")):  # fmt: skip
        file.write_text(bad)
        with pytest.raises(DataError, match=match):
            load_chat_template(tmp_path)
