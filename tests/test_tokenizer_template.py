"""The tokenizer and chat template inside a .emoe: checked on first use, rendered in a
bounded sandbox. A hostile template fails within about two seconds with a named error;
an ordinary one renders as Hugging Face renders it."""

from __future__ import annotations

import shutil
import threading
import time

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import formats.errors as E
from edgemoe.tokenizer import Tokenizer
from formats import constants as C
from formats.amend import amend
from formats.chat_template import compile_template, render
from formats.reader import EmoeReader

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again"},
]
VARS = {"messages": MESSAGES, "add_generation_prompt": True, "bos_token": "", "eos_token": ""}

HOSTILE = {
    "huge range": "{% for i in range(10**12) %}x{% endfor %}",
    "nested ranges": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "recursive macro": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "exponential macro": (
        "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
        "{{ f(0) }}"
    ),
    "string times": "{{ 'a' * 10**9 }}",
    "string doubling": "{% set s = 'aaaaaaaa' %}" + "{% set s = s ~ s %}" * 40 + "{{ s }}",
    "namespace doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(80) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s }}"
    ),
    "wide filter": "{{ 'a'|center(10**9) }}",
    "wide method": "{{ 'a'.ljust(10**9) }}",
    "wide format": "{{ '%0999999999d' % 1 }}",
    "big power": "{{ 7 ** (10**8) }}",
    "output flood": "{% for i in range(99999) %}{{ 'x' * 99 }}{% endfor %}",
    "list growth": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}"
        "{% endfor %}{{ ns.l|length }}"
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_fail_fast_with_a_named_error(name):
    t0 = time.monotonic()
    with pytest.raises(E.ChatTemplateLimit) as info:
        render(compile_template(HOSTILE[name]), VARS)
    assert time.monotonic() - t0 < 2.0, name
    assert "chat template" in str(info.value) and ";" in str(info.value)


def test_a_stopped_render_does_not_keep_running():
    before = threading.active_count()
    with pytest.raises(E.ChatTemplateLimit):
        render(compile_template(HOSTILE["nested ranges"]), VARS, time_limit=0.3)
    deadline = time.monotonic() + 3
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before  # the rendering thread ended, not abandoned busy


@pytest.mark.parametrize(
    "source,error,needle",
    [
        ("{% for m in messages %}", E.BadChatTemplate, "does not compile"),
        ("{{ messages[0]['content'] | nosuchfilter }}", E.BadChatTemplate, "does not compile"),
        (
            "{{ raise_exception('roles must alternate') }}",
            E.BadChatTemplate,
            "roles must alternate",
        ),
        ("{{ messages.__class__.__mro__ }}", E.BadChatTemplate, "failed"),
        ("{{ nothing() }}", E.BadChatTemplate, "failed"),
        ("{{ 1 // 0 }}", E.BadChatTemplate, "ZeroDivisionError"),
    ],
)
def test_broken_templates_are_named(source, error, needle):
    with pytest.raises(error, match=needle):
        render(compile_template(source), VARS)


def test_a_template_that_is_not_text():
    with pytest.raises(E.BadChatTemplate, match="is a int"):
        compile_template(42)


TEMPLATES = [
    # ChatML, as Qwen ships it
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant"
    "\\n' }}{% endif %}",
    # Mistral-style, with raise_exception on a bad order and loop.index0
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    # namespace, loop controls, filters, whitespace control
    "{%- set ns = namespace(sys='') -%}\n{%- for m in messages -%}\n  {%- if m.role == 'system' -%}"
    "{%- set ns.sys = m.content | trim -%}{%- break -%}{%- endif -%}\n{%- endfor -%}\n"
    "{{ ns.sys | upper }}|{% for m in messages[1:] %}{{ loop.index }}:{{ m.content | tojson }}"
    "{% if not loop.last %},{% endif %}{% endfor %}{% generation %}!{% endgeneration %}",
]


@pytest.mark.parametrize("source", TEMPLATES)
def test_ordinary_templates_render_as_hugging_face_does(source):
    # Hugging Face's environment: the immutable sandbox, trim/lstrip blocks, loop controls
    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_g"), [], [], body).set_lineno(lineno)

        def _g(self, caller):
            return caller()

    hf = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
    )
    hf.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    want = hf.from_string(source).render(**VARS)
    assert render(compile_template(source), VARS) == want
    assert want  # the case renders something


# ---- the Tokenizer of a file


@pytest.fixture(scope="module")
def model(tiny_emoe):
    return tiny_emoe("qwen3_moe")


def _copy(model, tmp_path, **kw):
    p = tmp_path / "m.emoe"
    shutil.copy(model, p)
    amend(p, **kw)
    return p


def test_tokenizer_of_a_good_file(model):
    with EmoeReader(model) as r:
        tok = Tokenizer(r)
    ids = tok.chat([{"role": "user", "content": "hello"}])
    assert ids and tok.decode(tok.encode("hello world")) == "hello world"
    assert "<|im_start|>assistant" in tok.render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "blob,needle",
    [
        (b"not json at all", "does not load"),
        (b'{"model": {"type": "BPE"}}', "does not load"),
        (b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_a_tokenizer_that_does_not_parse_is_named(model, tmp_path, blob, needle):
    p = _copy(model, tmp_path, blobs={C.BLOB_TOKENIZER: blob})
    with EmoeReader(p, check_model=True) as r:  # header-only: opening is fine
        with pytest.raises(E.BadTokenizer, match=needle):
            Tokenizer(r)


def test_a_tokenizer_bigger_than_the_vocabulary(model, tmp_path):
    with EmoeReader(model) as r:
        cfg = dict(r.config)
    p = _copy(model, tmp_path, metadata={C.M_CONFIG: {**cfg, "vocab_size": 300}})
    with EmoeReader(p) as r, pytest.raises(E.BadTokenizer, match="'vocab_size' is 300"):
        Tokenizer(r)


def test_a_template_that_does_not_compile_fails_at_first_chat(model, tmp_path):
    p = _copy(model, tmp_path, metadata={C.M_CHAT_TEMPLATE: "{% if x %}"})
    with EmoeReader(p, check_model=True) as r:
        tok = Tokenizer(r)
        assert tok.encode("plain prompts still work")
        with pytest.raises(E.BadChatTemplate, match="does not compile"):
            tok.chat([{"role": "user", "content": "hi"}])


def test_a_template_that_never_ends_fails_at_first_chat(model, tmp_path):
    p = _copy(model, tmp_path, metadata={C.M_CHAT_TEMPLATE: HOSTILE["exponential macro"]})
    with EmoeReader(p) as r:
        tok = Tokenizer(r)
        t0 = time.monotonic()
        with pytest.raises(E.ChatTemplateLimit):
            tok.chat([{"role": "user", "content": "hi"}])
        assert time.monotonic() - t0 < 2.0
