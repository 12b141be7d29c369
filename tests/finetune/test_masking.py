"""The loss mask survives tokenisation, truncation, padding and collation: checked against
literal tensors for SmolLM2's real tokenizer, whose pad token is also its end-of-turn token."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ray_app.engines.base import ChatFormatter
from ray_app.finetune.datasets import TextExample, labeller_examples, summary_examples
from ray_app.finetune.masking import (
    IGNORE_INDEX,
    TargetTooLong,
    TokenisedExample,
    collate,
    target_logits,
    target_loss,
    tokenise,
    tokenise_all,
    truncate_prompt,
)
from ray_app.labelling import prompts
from ray_app.labelling.conditions import condition_from_dict

M = IGNORE_INDEX
REPORTS = pd.DataFrame({
    "report_id": ["a", "b"],
    "text": ["FINDINGS: Heart normal.\nIMPRESSION: No acute disease.",
             "Comparison: none.\nImpression:\n  Small effusion.\n"],
})
# SmolLM2 ids: 'FINDINGS: Heart normal.\nIMPRESSION:' then ' No acute disease.' <|im_end|>
IDS_A = [54, 14300, 27727, 42, 9249, 2955, 30, 198, 5974, 32239, 4171, 42,
         2838, 8937, 1611, 30, 2]
LABELS_A = [M] * 12 + [2838, 8937, 1611, 30, 2]
# 'Comparison: none.\nImpression:' then '\n  Small effusion.' <|im_end|>
IDS_B = [48718, 42, 7182, 30, 198, 22326, 1641, 42, 3805, 9946, 745, 3919, 30, 2]
LABELS_B = [M] * 8 + [3805, 9946, 745, 3919, 30, 2]
END_TURN = 2  # <|im_end|>: SmolLM2's EOS *and* pad token


@pytest.fixture(scope="module")
def summaries():
    examples, report = summary_examples(REPORTS)
    assert report.examples == 2
    return examples


def test_summary_tokens_are_the_only_labels(smollm2_tokenizer, summaries):
    a, b = (tokenise(smollm2_tokenizer, e, max_length=64) for e in summaries)
    assert (a.input_ids, a.labels) == (IDS_A, LABELS_A)
    assert (b.input_ids, b.labels) == (IDS_B, LABELS_B)
    target = [t for t in a.labels if t != M]
    assert smollm2_tokenizer.decode(target) == " No acute disease.<|im_end|>"
    assert not a.truncated


def test_collation_pads_without_touching_the_mask(smollm2_tokenizer, summaries):
    assert smollm2_tokenizer.pad_token_id == END_TURN
    batch = collate([tokenise(smollm2_tokenizer, e, 64) for e in summaries],
                    pad_id=smollm2_tokenizer.pad_token_id)
    pad = 17 - len(IDS_B)
    assert torch.equal(batch["input_ids"], torch.tensor([IDS_A, IDS_B + [END_TURN] * pad]))
    assert torch.equal(batch["labels"], torch.tensor([LABELS_A, LABELS_B + [M] * pad]))
    assert torch.equal(batch["attention_mask"],
                       torch.tensor([[1] * 17, [1] * len(IDS_B) + [0] * pad]))
    # The trained end-of-turn token of row b has the pad id but keeps its label.
    assert batch["labels"][1, len(IDS_B) - 1] == END_TURN


def test_collation_to_a_multiple(smollm2_tokenizer, summaries):
    batch = collate([tokenise(smollm2_tokenizer, summaries[1], 64)], pad_id=0,
                    pad_to_multiple_of=8)
    assert torch.equal(batch["labels"], torch.tensor([LABELS_B + [M] * 2]))
    assert torch.equal(batch["input_ids"], torch.tensor([IDS_B + [0] * 2]))


def test_truncation_cuts_the_prompt_middle_and_keeps_the_target(smollm2_tokenizer, summaries):
    cut = tokenise(smollm2_tokenizer, summaries[0], max_length=10, head_tokens=2)
    # 5 target tokens; of 12 prompt tokens the first 2 and the last 3 stay.
    assert cut.input_ids == [54, 14300, 32239, 4171, 42, 2838, 8937, 1611, 30, 2]
    assert cut.labels == [M, M, M, M, M, 2838, 8937, 1611, 30, 2]
    assert cut.truncated
    collated = collate([cut], pad_id=END_TURN)
    assert collated["labels"].tolist() == [cut.labels]


def test_target_longer_than_max_length_is_dropped_and_counted(smollm2_tokenizer, summaries):
    with pytest.raises(TargetTooLong, match="does not fit max_length 5"):
        tokenise(smollm2_tokenizer, summaries[0], max_length=5)
    # a: 5 target tokens leave room for 1 prompt token (the one next to the target);
    # b: 6 target tokens leave none.
    kept, counts = tokenise_all(smollm2_tokenizer, summaries, max_length=6, head_tokens=2)
    assert [e.example_id for e in kept] == ["a"]
    assert counts == {"truncated": 1, "dropped_target_too_long": 1}
    assert (kept[0].input_ids, kept[0].labels) == ([42] + IDS_A[-5:], [M] + LABELS_A[-5:])


def test_truncate_prompt_keeps_head_and_tail():
    assert truncate_prompt(list(range(10)), 6, head=2) == [0, 1, 6, 7, 8, 9]
    assert truncate_prompt(list(range(10)), 4, head=8) == [0, 1, 8, 9]  # head <= half
    assert truncate_prompt(list(range(3)), 6, head=2) == [0, 1, 2]


def test_labeller_answer_is_the_token_the_engine_scores(smollm2_tokenizer):
    condition = condition_from_dict({"name": "cardiomegaly",
                                     "definition": "An enlarged heart."}, "test")
    labels = pd.DataFrame({"report_id": ["a"], "condition": ["cardiomegaly"], "level": [""],
                           "label": [0]})
    examples, _ = labeller_examples(REPORTS.head(1), labels, [condition])
    tokenised = tokenise(smollm2_tokenizer, examples[0], max_length=512)
    formatter = ChatFormatter(smollm2_tokenizer)
    conversation = prompts.direct_conversation(prompts.DEFAULT_TEMPLATE, condition,
                                               REPORTS.text[0])
    prompt = formatter.token_ids(conversation)  # exactly what the engines score after
    no_id = smollm2_tokenizer.encode("no", add_special_tokens=False)
    assert no_id == [4607] and 4607 in formatter.answer_tokens.no_ids
    assert tokenised.input_ids == prompt + no_id
    assert tokenised.labels == [M] * len(prompt) + no_id
    assert prompt[-3:] == [520, 9531, 198]  # '<|im_start|>assistant\n' opened, then the answer
    batch = collate([tokenised, tokenise(smollm2_tokenizer, TextExample("s", "x", "yes",
                                                                          end_turn=False), 8)],
                    pad_id=END_TURN)
    assert batch["labels"][0].tolist() == tokenised.labels
    assert batch["labels"][1].tolist() == [M, 10407] + [M] * (len(prompt) - 1)


def _tiny_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two right-padded rows with targets of different lengths at different positions."""
    ids = torch.randint(3, vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    a = TokenisedExample("a", ids[0].tolist(), [M] * 6 + ids[0, 6:].tolist())
    b = TokenisedExample("b", ids[1, :5].tolist(), [M] * 4 + ids[1, 4:5].tolist())
    return collate([a, b], pad_id=0)


def test_loss_from_the_target_logits_alone_is_the_full_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = _tiny_batch(model.config.vocab_size)
    projected = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: projected.append(inputs[0].shape))
    with torch.no_grad():
        full = model(**batch)
        ours = target_loss(model, batch)
        logits, targets, keep = target_logits(model, batch)
    assert torch.allclose(ours, full.loss, atol=1e-6)
    assert projected[0][:2] == (2, 9)        # transformers' loss: every position of both rows
    assert projected[1][:2] == (2, 4)  # ours: positions 5-7 (a) and 3 (b) predict a target
    assert torch.equal(targets, torch.tensor(batch["input_ids"][0, 6:].tolist()
                                             + batch["input_ids"][1, 4:5].tolist()))
    assert torch.allclose(logits, full.logits[keep], atol=1e-4)  # matmuls of other shapes
