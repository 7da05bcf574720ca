"""``genai_config.json``: what onnxruntime-genai's ``og.Model(folder)`` reads to drive the decoder.

Field names follow the config onnxruntime-genai's own model builder writes (models/builders/base.py,
``make_genai_config``). Our graph concatenates past and present K/V (plain ops, no in-place cache), so
``past_present_share_buffer`` is false.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..dsquant.archs import ARCHITECTURES
from ..dsquant.tokenizer_facts import read_json, resolve_tokenizer
from .onnx_graph import ATTENTION, arch_spec

EP_OPTIONS: dict[str, list] = {"cpu": [], "cuda": [{"cuda": {}}], "dml": [{"dml": {}}], "coreml": [{"coreml": {}}]}


def genai_config(cfg: dict, src: Path, ep: str) -> dict:
    """The genai_config.json dict for an export of ``src`` (``cfg``: its config.json) targeting ``ep``.

    Token ids come from :func:`resolve_tokenizer`: ``eos_token_id`` is the whole end-of-generation list
    (generation_config.json's list, the tokenizer's EOS and the chat template's turn end such as
    ``<|im_end|>``), since genai stops only at the ids listed here; pad falls back to the first EOS.
    """
    facts = resolve_tokenizer(src)
    eos: int | list[int] | None = list(facts.eog_ids) or None
    if eos is not None and len(eos) == 1:
        eos = eos[0]
    pad = facts.pad_id
    if pad is None:
        pad = facts.eog_ids[0] if facts.eog_ids else None
    context = cfg.get("max_position_embeddings", 4096)
    key_shape, _ = ATTENTION[arch_spec(cfg).attention][1](cfg)  # [batch, kv_heads, past, head_size]
    config = {
        "model": {
            "bos_token_id": facts.bos_id,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": EP_OPTIONS[ep]},
                "filename": "model.onnx",
                "head_size": key_shape[3],
                "hidden_size": cfg["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg["num_attention_heads"],
                "num_hidden_layers": cfg["num_hidden_layers"],
                "num_key_value_heads": key_shape[1],
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": ARCHITECTURES[cfg["model_type"]].genai_type,
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    # genai's JSON reader wants numbers for token ids: a model without (say) a BOS token omits the key.
    config["model"] = {k: v for k, v in config["model"].items() if v is not None}
    return config


def write_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Write the tokenizer side files of ``src`` into the export ``out`` so onnxruntime-genai's tokenizer
    (onnxruntime-extensions) does what transformers does; returns notes for the report.

    genai reads ``tokenizer_config.json`` where transformers looks elsewhere or not at all: it adds an EOS
    when ``add_eos_token`` is set (transformers drops the key beside a tokenizer.json), and a
    ``chat_template`` list stops it loading the folder. So the exported ``tokenizer_config.json`` states
    the resolved facts: the special tokens by name, ``add_bos_token``/``add_eos_token`` as transformers
    behaves, and the default chat template as a string (also ``chat_template.jinja``; other named
    templates go to ``chat_templates/NAME.jinja``, where transformers finds them). When transformers'
    tokenizer class rebuilds the pipeline from config.json's ``model_type`` (Qwen2Tokenizer: NFC, its own
    split regex), the folder, which has no config.json, gets that pipeline's ``tokenizer.json`` and class name.
    """
    facts = resolve_tokenizer(src)
    if facts.tokenizer_class == "none":
        return []
    tcfg = read_json(src, "tokenizer_config.json") or {}
    if facts.effective_tokenizer is not None and facts.effective_tokenizer != read_json(src, "tokenizer.json"):
        (out / "tokenizer.json").write_text(json.dumps(facts.effective_tokenizer, ensure_ascii=False), encoding="utf-8")
        tcfg["tokenizer_class"] = facts.tokenizer_class
    for kind in ("bos", "eos", "pad", "unk"):
        if facts.tokens[kind] is not None:
            tcfg[f"{kind}_token"] = facts.tokens[kind]
    tcfg["add_bos_token"], tcfg["add_eos_token"] = facts.add_bos, facts.add_eos
    tcfg.pop("chat_template", None)
    if facts.chat_template is not None:
        tcfg["chat_template"] = facts.chat_template
        (out / "chat_template.jinja").write_text(facts.chat_template, encoding="utf-8")
    others = {n: t for n, t in facts.chat_templates.items() if n != "default"}
    if others:
        (out / "chat_templates").mkdir(exist_ok=True)
        for name, text in others.items():
            (out / "chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False), encoding="utf-8")
    notes = []
    if facts.prefix_ids and not facts.add_bos:
        notes.append(f"the tokenizer adds {list(facts.prefix_ids)} before the text; genai can add only the BOS")
    return notes
