"""Tokenising, padding and masks, prompt-length sampling, and the resumable batch order."""

import numpy as np
import pytest

from jaxrlhf import data
from jaxrlhf.errors import ConfigError

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    from jaxrlhf.models import load_tokenizer

    return load_tokenizer(tiny_data / "data" / "tokenizers" / "gpt2")


def test_prompts_are_left_padded_and_keep_their_end(tokenizer):
    prompts = ["Request: Walk the dog now.\nReply:", "Request: Hi\nReply:"]
    enc = data.encode_prompts(tokenizer, prompts, max_tokens=5)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 5) and mask[:, -1].all()
    assert tokenizer.decode(ids[0][mask[0] == 1]).endswith("\nReply:")
    full = tokenizer(prompts[1], add_special_tokens=False)["input_ids"]
    assert list(ids[1][mask[1] == 1]) == full[-5:]
    assert list(enc["cut"]) == [len(tokenizer(p, add_special_tokens=False)["input_ids"]) > 5 for p in prompts]
    wide = data.encode_prompts(tokenizer, prompts, max_tokens=5, pad_to=9)
    assert wide["input_ids"].shape == (2, 9) and (wide["attention_mask"][:, :4] == 0).all()


def test_rollout_prompts_cut_to_fit_are_counted_in_a_warning(tokenizer):
    """Every stage that samples encodes its prompts here: a prompt longer than
    sampling.max_prompt_tokens keeps its end, and the count of such prompts is reported, as
    every other cut to fit is."""
    from jaxrlhf.config import DataConfig, SamplingSection
    from jaxrlhf.stages.rollout import encode_prompt_rows

    rows = [{"prompt": "Request: Please walk the dog and feed the cat today.\nReply:"}, {"prompt": "Hi\nReply:"}] * 3
    with pytest.warns(UserWarning, match=r"^3 of 6 prompts cut to sampling.max_prompt_tokens=6 \(their end kept\)$"):
        ids, mask, texts = encode_prompt_rows(rows, tokenizer, SamplingSection(max_prompt_tokens=6), 0,
                                              DataConfig("prompts.jsonl"), "policy")
    assert mask.sum(1).max() == 6 and texts[0].endswith("\nReply:") and texts[1] == "Hi\nReply:"


def test_prompt_length_range_cuts_each_prompt_to_its_first_tokens(tokenizer):
    prompts = ["Request: Please walk the dog and feed the cat today.\nReply:"] * 50
    enc = data.encode_prompts(tokenizer, prompts, max_tokens=8, length_range=(2, 4), seed=1)
    ids, lengths = enc["input_ids"], enc["attention_mask"].sum(1)
    assert set(lengths) == {2, 3, 4} and not enc["cut"].any()  # cut on purpose, not to fit
    first = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    for row, m, n in zip(ids, enc["attention_mask"], lengths):
        assert list(row[m == 1]) == first[:n]
    again = data.encode_prompts(tokenizer, prompts, max_tokens=8, length_range=(2, 4), seed=1)
    np.testing.assert_array_equal(again["input_ids"], ids)


def test_completion_only_masks_cover_the_response_and_eos(tokenizer):
    enc = data.encode_pairs_of_text(tokenizer, ["Request: Hi\nReply:"], [" Hello there."], max_length=16)
    n_prompt = len(tokenizer("Request: Hi\nReply:", add_special_tokens=False)["input_ids"])
    n_resp = len(tokenizer(" Hello there.", add_special_tokens=False)["input_ids"]) + 1
    assert enc["attention_mask"][0].sum() == n_prompt + n_resp
    assert (enc["loss_mask"][0, :n_prompt] == 0).all() and enc["loss_mask"][0].sum() == n_resp
    assert enc["input_ids"][0, n_prompt + n_resp - 1] == tokenizer.eos_token_id
    whole = data.encode_pairs_of_text(tokenizer, ["Request: Hi\nReply:"], [" Hello there."], 16, completion_only=False)
    np.testing.assert_array_equal(whole["loss_mask"], whole["attention_mask"])
    cut = data.encode_pairs_of_text(tokenizer, ["Request: Hi\nReply:"], [" Hello there."], max_length=n_prompt + 2)
    # The response's body is cut to fit, its EOS kept (the model still learns to stop), the prompt kept.
    first_response_token = tokenizer(" Hello there.", add_special_tokens=False)["input_ids"][0]
    assert list(cut["input_ids"][0, n_prompt:]) == [first_response_token, tokenizer.eos_token_id]
    assert cut["loss_mask"][0].sum() == 2 and list(cut["cut"]) == [True] and list(enc["cut"]) == [False]


def test_batch_order_is_a_pure_function_of_the_step():
    first_epoch = np.concatenate([data.batch_indices(10, 3, step, seed=0) for step in range(3)])
    assert len(set(first_epoch)) == 9  # a permutation; the incomplete tail batch is dropped
    np.testing.assert_array_equal(data.batch_indices(10, 3, 4, seed=0), data.batch_indices(10, 3, 4, seed=0))
    assert not np.array_equal(data.batch_indices(10, 3, 0, seed=0), data.batch_indices(10, 3, 3, seed=0))
    with pytest.raises(ConfigError, match="batch_size=11 is larger than the 10 rows"):
        data.batch_indices(10, 11, 0, seed=0)


# SmolLM2-135M-Instruct's chat template (a default system message, ChatML turns).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_conversational_prompts_are_rendered_by_the_chat_template_with_the_generation_prompt(tokenizer, tmp_path):
    """A prompts file of conversations (TRL's conversational form) is encoded, by the function
    every sampling stage encodes its prompts with, exactly as
    `apply_chat_template(messages, add_generation_prompt=True)` tokenizes them; the rows keep
    the messages (the prompt a reward function is given)."""
    import copy
    import json

    from jaxrlhf.config import DataConfig, SamplingSection
    from jaxrlhf.stages.rollout import encode_prompt_rows, load_prompt_rows

    chat = copy.deepcopy(tokenizer)
    chat.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chat.chat_template = CHATML
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Walk the dog."}]]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in conversations))
    source = DataConfig(str(path))
    rows = load_prompt_rows(source)
    ids, mask, texts = encode_prompt_rows(rows, chat, SamplingSection(max_prompt_tokens=200), 0, source, "policy")
    assert [r["prompt"] for r in rows] == conversations
    for row_ids, row_mask, text, messages in zip(ids, mask, texts, conversations):
        want = chat.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(row_ids[row_mask == 1]) == list(want)
        assert text == chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert texts[0].endswith("<|im_start|>assistant\n") and "<|im_start|>system" in texts[0]


def test_conversational_prompts_without_a_chat_template_are_one_error_naming_the_file_and_column(tokenizer, tmp_path):
    from jaxrlhf.config import DataConfig, SamplingSection
    from jaxrlhf.stages.rollout import encode_prompt_rows, load_prompt_rows

    path = tmp_path / "chats.jsonl"
    path.write_text('{"question": [{"role": "user", "content": "What is 2 + 3?"}]}\n')
    source = DataConfig(str(path), columns={"prompt": "question"})
    rows = load_prompt_rows(source)
    assert not getattr(tokenizer, "chat_template", None)
    with pytest.raises(ConfigError, match=rf"^{path}: column 'question' holds conversations, but the tokenizer of "
                                          r"runs/x/sft has no chat template to render them; [^\n]*$"):
        encode_prompt_rows(rows, tokenizer, SamplingSection(), 0, source, "runs/x/sft")
    path.write_text('{"question": [{"role": "user", "text": "What is 2 + 3?"}]}\n')
    with pytest.raises(ConfigError, match=rf"^{path}: row 1, column 'question': expected text or a list of messages "):
        load_prompt_rows(source)
