"""The Vicuna v1 chat template that converted LLaVA-1.5 / ShareGPT4V processors carry."""

from __future__ import annotations

__all__ = ["VICUNA_V1_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM_PROMPT"]

#: The system prompt of LLaVA's ``conv_vicuna_v1`` (ShareGPT4V's ``share4v_v1``) template.
VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

#: Vicuna v1 conversation format (``SeparatorStyle.TWO``, ``sep=" "``, ``sep2="</s>"``):
#: ``"{system} USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:"``.
#: Without a system message the Vicuna system prompt is used, as in LLaVA's evaluation code.
#: Images of a message are rendered before its text, each as ``<image>\n``.
VICUNA_V1_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_V1_SYSTEM_PROMPT.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system ~ ' ' -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('Vicuna v1 knows the roles system (first message only), "
    "user and assistant, got ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token if eos_token is defined else '</s>' -}}"
    "{%- else -%}{{- ' ' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
