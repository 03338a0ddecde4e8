"""The merged model's chat template (`chat_template`, as mergekit's key of that name).

    auto          the template most of the inputs' tokenizers have (the earlier input wins a tie);
                  none has one: the output keeps its tokenizer's own
    a name        one of the built-in templates below (mergekit ships the same names)
    Jinja text    used as written (it must contain `{` and be 20 characters or more, as in mergekit)

The built-in templates are written here, for the prompt formats the names stand for; they render
with transformers' `apply_chat_template`, which supplies `bos_token`, `eos_token`,
`add_generation_prompt` and `raise_exception`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import RecipeError

BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>role\ncontent<|im_end|>\n per message.
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Llama 3: a header per message, the content trimmed, <|eot_id|> after each; BOS once at the start.
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    # Mistral instruct: [INST] user [/INST] answer</s>; an optional system message opens the first turn.
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
        "{{- raise_exception('after an optional system message, roles must alternate user, assistant, user, ...') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system is not none -%}{{- ' [INST] ' ~ system ~ '\\n\\n' ~ message['content'] ~ ' [/INST]' -}}"
        "{%- else -%}{{- ' [INST] ' ~ message['content'] ~ ' [/INST]' -}}{%- endif -%}"
        "{%- else -%}{{- ' ' ~ message['content'] ~ eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Alpaca: the (last) system message, then ### Instruction / ### Input / ### Response sections.
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
        "{%- set headers = {'user': '### Instruction:', 'user_context': '### Input:', 'assistant': '### Response:'} -%}"
        "{%- if systems -%}{{- (systems[-1]['content'] | trim) ~ '\\n\\n' -}}{%- endif -%}"
        "{%- for message in turns if message['role'] in headers -%}"
        "{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{{- headers[message['role']] ~ '\\n' ~ (message['content'] | trim) -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and (not turns or turns[-1]['role'] != 'assistant') -%}"
        "{{- ('\\n\\n' if turns else '') ~ '### Response:\\n' -}}"
        "{%- endif -%}"
    ),
    # EXAONE: [|role|]content, user turns end with a newline, others with [|endofturn|]; an empty
    # system turn opens a conversation that has none.
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
        "{{- '[|' ~ message['role'] ~ '|]' ~ message['content'] -}}"
        "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}


@dataclass(frozen=True)
class ChosenTemplate:
    template: str | None  # None: leave the output tokenizer's template as it is
    note: str  # for compression.json: the built-in name, "auto: <input>", "custom" or why none


def _template_of(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    if isinstance(template, dict):  # named templates: the default one, as mergekit reads it
        template = template.get("default")
    return template.strip() if template else None


def _check_jinja(text: str, where: dict[str, str]) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers renders chat templates in
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]).parse(text)
    except TemplateSyntaxError as err:
        raise RecipeError(f"chat_template is not valid Jinja (line {err.lineno} of the template: {err.message})", **where) from None


def choose_chat_template(setting: str, folders: list[tuple[str, Path]], where: dict[str, str]) -> ChosenTemplate:
    """`setting` resolved against the inputs (reference, tokenizer folder), in input order."""
    if setting == "auto":
        found = [(reference, template) for reference, folder in folders if (template := _template_of(folder))]
        if not found:
            return ChosenTemplate(None, "auto: no input has a chat template")
        counts = Counter(template for _, template in found)
        best = max(counts.values())
        reference, template = next((ref, t) for ref, t in found if counts[t] == best)  # first in input order
        return ChosenTemplate(template, f"auto: {reference}'s ({best} of {len(folders)} inputs)")
    if setting in BUILTIN_CHAT_TEMPLATES:
        return ChosenTemplate(BUILTIN_CHAT_TEMPLATES[setting], setting)
    if len(setting) < 20 or "{" not in setting:
        raise RecipeError(
            f"chat_template {setting!r} is not a built-in template ({', '.join(sorted(BUILTIN_CHAT_TEMPLATES))}),"
            " auto, or a Jinja template",
            **where,
        )
    _check_jinja(setting, where)
    return ChosenTemplate(setting, "custom")


TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def write_chat_template(folder: Path, template: str) -> None:
    """Set the tokenizer saved in `folder` to `template` and save it again."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for name in TEMPLATE_FILES:  # a copied template file would otherwise shadow the new one
        (folder / name).unlink(missing_ok=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
