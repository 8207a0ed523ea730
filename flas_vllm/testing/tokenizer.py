"""The fixtures' tokenizers: byte-level BPE trained on the bundled AlpacaEval text, dressed up as each
family's tokenizer (special tokens, BOS rule, chat template)."""

from __future__ import annotations

import json
import pathlib

# Gemma's id order for the first special tokens, so code that hard-codes
# pad=0 / eos=1 / bos=2 (as Gemma checkpoints do) behaves the same here.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, SOT_ID, EOT_ID = range(len(SPECIAL_TOKENS))

GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

VOCAB_SIZE = 1536

MAX_POSITIONS = 1024  # model_max_length of the tokenizers, max_position_embeddings of the tiny models


# --------------------------------------------------------------------------- tokenizer


GEMMA_TOKENIZER: dict = {
    "special_tokens": SPECIAL_TOKENS, "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>",
    "extra": ["<start_of_turn>", "<end_of_turn>"], "template": GEMMA2_CHAT_TEMPLATE,
}


def _build_tokenizer(rows: list[dict], out_dir: pathlib.Path, spec: dict = GEMMA_TOKENIZER):
    """Byte-level BPE on the bundled corpus, dressed up as the family's tokenizer (`spec`; Gemma's default).

    Byte-level means no <unk> ever appears; the post-processor adds the BOS the
    way the real tokenizer does (none where `spec["bos"]` is None, as Qwen's), so a
    chat template that also emits ``{{ bos_token }}`` must be tokenized with
    ``add_special_tokens=False`` exactly as with the real model.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials, bos, extra = spec["special_tokens"], spec["bos"], spec["extra"]
    tk = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [r["instruction"] for r in rows] + [r["output"] for r in rows]
    tk.train_from_iterator(corpus, trainer)
    if tk.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"BPE produced {tk.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for i, t in enumerate(specials):
        assert tk.token_to_id(t) == i, (t, tk.token_to_id(t))
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, specials.index(bos))],
        )

    names = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k] is not None}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **{f"{k}_token": v for k, v in names.items()},
        additional_special_tokens=extra,
        padding_side="left",
        chat_template=spec["template"],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)

    # transformers 5 writes tokenizer_class "TokenizersBackend", keeps the
    # template only in chat_template.jinja and drops special_tokens_map.json.
    # Add the classic spellings too so readers expecting the 4.x layout (and
    # anything that parses tokenizer_config.json directly) still work.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=spec["template"],
        add_bos_token=bos is not None,
        add_eos_token=False,
        additional_special_tokens=extra,
        padding_side="left",
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special_map = {**{f"{k}_token": v for k, v in names.items()}, "additional_special_tokens": extra}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # Hand back the tokenizer as a consumer will see it after loading.
    return AutoTokenizer.from_pretrained(out_dir)
