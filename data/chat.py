"""Chat templates, rendered as transformers renders them (`apply_chat_template`), for any
tokenizer with a `chat_template` (a Hugging Face directory: data/hf_tokenizer.py).

    text = render_chat(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = chat_ids(tok, messages)                      # = AutoTokenizer.apply_chat_template
    text, spans = render_chat(tok, messages, with_spans=True)  # {% generation %} character spans

The environment is transformers' (utils/chat_template_utils.py): a sandboxed jinja2 with
trim_blocks and lstrip_blocks, the loopcontrols extension and `{% generation %}` blocks, a
`tojson` that does not escape HTML, and the globals raise_exception, strftime_now, dict and
namespace. The template sees messages, tools, documents, add_generation_prompt, the named
special tokens (bos_token, eos_token, ...) and any extra keyword. The rendered text is encoded
with the tokenizer's own rule for special-token strings (their ids, as transformers does with
add_special_tokens=False): the template alone decides where BOS goes.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or the template refused the messages."""


@functools.lru_cache(maxsize=8)
def compile_template(template: str):
    """A jinja2 Template in transformers' environment (cached: templates are long)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body and records where."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark", [jinja2.nodes.ContextReference()])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, context, caller):
            text = caller()
            tracking = context.get("__spans__")
            if tracking is not None:  # (text yielded so far, spans): the block starts here
                rendered, spans = tracking
                start = sum(len(chunk) for chunk in rendered)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r}")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=dict,
        namespace=Namespace,
    )
    return env.from_string(template)


def render_chat(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    with_spans: bool = False,
    template: str | None = None,
    **variables,
):
    """The text of `messages` under the tokenizer's chat template (or `template`).

    with_spans: also return the (start, end) character spans of `{% generation %}` blocks
    (the assistant's part, for a loss on the answer only), as transformers finds them.
    """
    import jinja2

    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has no chat template "
            "(chat_template.jinja, or chat_template in tokenizer_config.json)"
        )
    specials = getattr(tokenizer, "special_token_strings", {})
    context = {**{k: v for k, v in specials.items() if k in SPECIAL_NAMES}, **variables}
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    rendered: list[str] = []
    spans: list[tuple[int, int]] = []
    try:  # streamed, so a generation block knows how much text precedes it
        for chunk in compile_template(template).generate(
            messages=messages, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, __spans__=(rendered, spans), **context,
        ):
            rendered.append(chunk)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    text = "".join(rendered)
    return (text, spans) if with_spans else text


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
             **kwargs) -> list[int]:
    """Token ids of the rendered chat: transformers' apply_chat_template(tokenize=True)."""
    return tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt, **kwargs))
