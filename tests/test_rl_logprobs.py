"""OnlineRLTrainer's completion-only log-probs (each distinct prompt run once, the LM head over completions only)
against TRL's fused-head path over every position, on the same model and batch."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import GenerationConfig
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from recipes.rl import OnlineRLTrainer
from recipes.rl_generation import generate_sharing_prompts, sample_inverse_cdf
from tests.conftest import tiny_text_kwargs

PAD = 0


def _model() -> Llama4ForCausalLM:
    # A 16-token attention chunk, so prompt and completion cross chunk boundaries of the chunked layers.
    model = Llama4ForCausalLM(Llama4TextConfig(**tiny_text_kwargs(router_aux_loss_coef=0.01)))
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model.train()


def _trainer(**args) -> OnlineRLTrainer:
    trainer = OnlineRLTrainer.__new__(OnlineRLTrainer)  # only what the log-prob methods read
    trainer.accelerator = Accelerator(cpu=True)
    trainer.args = SimpleNamespace(**{"gradient_checkpointing": False, "cast_lm_head_to_fp32": False, **args})
    trainer.temperature = 0.7
    return trainer


def _batch(prompt_lengths, completion_lengths, group: int, generator):
    """GRPO's layout: left-padded prompts, each repeated `group` times, then right-padded completions."""
    width, completion_width = max(prompt_lengths), max(completion_lengths)
    rows, masks = [], []
    for index, length in enumerate(prompt_lengths):
        prompt = torch.randint(3, 96, (length,), generator=generator)
        for k in range(group):
            done = completion_lengths[(index * group + k) % len(completion_lengths)]
            completion = torch.randint(3, 96, (done,), generator=generator)
            ids = torch.full((width + completion_width,), PAD)
            mask = torch.zeros(width + completion_width, dtype=torch.long)
            ids[width - length : width], mask[width - length : width] = prompt, 1
            ids[width : width + done], mask[width : width + done] = completion, 1
            rows.append(ids)
            masks.append(mask)
    return torch.stack(rows), torch.stack(masks), completion_width


def _run(method, trainer, model, ids, mask, keep, **kwargs):
    model.zero_grad()
    logps, entropies, aux = method(trainer, model, ids, mask, keep, compute_entropy=True, **kwargs)
    completion_mask = mask[:, -keep:]
    loss = (logps * completion_mask).sum() + 0.1 * (entropies * completion_mask).sum()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropies.detach(), aux, grads


@pytest.mark.parametrize(
    ("prompt_lengths", "group", "compute_aux_loss"),
    [((21, 9, 30), 4, True), ((5, 17), 3, False), ((12, 12, 7, 25), 1, True)],
)
def test_completion_only_logps_equal_trls_full_path(prompt_lengths, group, compute_aux_loss):
    generator = torch.Generator().manual_seed(len(prompt_lengths) * 10 + group)
    model, trainer = _model(), _trainer()
    ids, mask, keep = _batch(prompt_lengths, (7, 3, 11, 1), group, generator)
    ours = _run(OnlineRLTrainer._get_per_token_logps_and_entropies, trainer, model, ids, mask, keep,
                compute_aux_loss=compute_aux_loss)  # fmt: skip
    trls = _run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, model, ids, mask, keep,
                compute_aux_loss=compute_aux_loss)  # fmt: skip
    torch.testing.assert_close(ours[0], trls[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], trls[1], atol=2e-5, rtol=1e-5)
    assert bool((ours[0][mask[:, -keep:] == 0] == 0).all())  # zero at completion padding, as TRL's
    if compute_aux_loss:
        torch.testing.assert_close(ours[2], trls[2], atol=1e-6, rtol=1e-6)
    else:
        assert ours[2] is None and trls[2] is None
    assert ours[3].keys() == trls[3].keys() and ours[3]
    for name in trls[3]:
        torch.testing.assert_close(ours[3][name], trls[3][name], atol=1e-5, rtol=1e-4, msg=name)


def test_completion_only_logps_without_grad_and_in_row_chunks():
    """The no-grad call GRPO makes for old/reference log-probs, with `batch_size` splitting the rows."""
    generator = torch.Generator().manual_seed(7)
    model, trainer = _model(), _trainer()
    ids, mask, keep = _batch((14, 6), (5, 2, 9), 4, generator)
    with torch.no_grad():
        ours, _, _ = OnlineRLTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, keep, batch_size=3)
        trls, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, keep)
    torch.testing.assert_close(ours, trls, atol=2e-5, rtol=1e-5)


def test_completion_only_logps_when_the_prompt_is_one_token():
    """No prompt prefix to share: the single prompt token runs with the completions."""
    generator = torch.Generator().manual_seed(3)
    model, trainer = _model(), _trainer()
    ids, mask, keep = _batch((1,), (4, 6), 2, generator)
    ours = _run(OnlineRLTrainer._get_per_token_logps_and_entropies, trainer, model, ids, mask, keep)
    trls = _run(GRPOTrainer._get_per_token_logps_and_entropies, trainer, model, ids, mask, keep)
    torch.testing.assert_close(ours[0], trls[0], atol=2e-5, rtol=1e-5)
    for name in trls[3]:
        torch.testing.assert_close(ours[3][name], trls[3][name], atol=1e-5, rtol=1e-4, msg=name)


def test_trls_path_where_prompts_cannot_be_shared():
    model = _model()
    assert _trainer()._can_share_prompts(model)
    assert not _trainer(gradient_checkpointing=True)._can_share_prompts(model)  # checkpointed layers drop caches
    assert _trainer(gradient_checkpointing=True)._can_share_prompts(model, generation=True)
    # Under DDP the old-policy pass (called with the bare model) takes TRL's path too, as the training pass must.
    ddp = _trainer()
    ddp.model_wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    ddp.accelerator.unwrap_model = lambda m, **kwargs: model if m is ddp.model_wrapped else m
    assert not ddp._can_share_prompts(model) and ddp._can_share_prompts(model, generation=True)


def test_trls_path_under_zero3_and_for_prompt_learning_adapters(monkeypatch):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    import recipes.rl

    model = _model()
    monkeypatch.setattr(recipes.rl, "is_deepspeed_zero3_enabled", lambda: True)  # lm_head.weight: empty partition
    assert not _trainer()._can_share_prompts(model) and not _trainer()._can_share_prompts(model, generation=True)
    monkeypatch.undo()
    prompt_tuned = get_peft_model(_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not _trainer()._can_share_prompts(prompt_tuned, generation=True)  # virtual tokens live in PEFT's forward
    lora = get_peft_model(_model(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert _trainer()._can_share_prompts(lora)


def _eos_at_different_steps(model, ids, mask, max_new_tokens: int) -> list[int]:
    """EOS ids that end the rows' greedy answers at different steps, so rows leave the batch one after another."""
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    answers = plain[:, ids.shape[1] :]
    return sorted({int(answers[0, 2]), int(answers[3, 3]), int(answers[6, 4])})  # one per prompt


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("rows_finish_early", [False, True])
def test_generate_sharing_prompts_gives_generates_greedy_tokens(rows_finish_early, cache):
    """Left-padded prompts repeated as GRPO batches them (chunk boundaries crossed), router logits on in the
    config, rows that end at different steps (and so leave the batch): the tokens of a plain greedy `generate`
    (dynamic cache)."""
    generator = torch.Generator().manual_seed(11)
    model = _model().eval()
    model.config.output_router_logits = True
    ids, mask, keep = _batch((21, 9, 30), (1,), 3, generator)
    ids, mask = ids[:, :-keep], mask[:, :-keep]
    # Row 3 repeats row 0's prompt with another answer: a finished row leaves while its prompt's twins go on.
    eos = _eos_at_different_steps(model, ids, mask, 12) if rows_finish_early else None
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    config = GenerationConfig(**options, cache_implementation=cache)
    ours = generate_sharing_prompts(model, ids, mask, generation_config=config)
    assert config.cache_implementation == cache  # the caller's config is left as it was
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**options))
    assert ours.shape == plain.shape and ours.shape[1] > ids.shape[1]
    assert torch.equal(ours, plain)
    if rows_finish_early:  # the rows did finish at different steps, some before the end
        ends = torch.isin(ours[:, ids.shape[1] :], torch.tensor(eos)).int().argmax(dim=1)
        assert len(set(ends.tolist())) >= 2


def test_sampled_decoding_applies_generates_logits_processors():
    """Sampling with top_k=1 keeps one token per step: the greedy answer, so the processors run before the draw;
    tokens a processor suppresses are never drawn; a seeded draw repeats."""
    generator = torch.Generator().manual_seed(3)
    model = _model().eval()
    ids, mask, keep = _batch((14, 6), (1,), 4, generator)
    ids, mask = ids[:, :-keep], mask[:, :-keep]
    greedy = generate_sharing_prompts(
        model, ids, mask, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    )
    top1 = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1, temperature=0.7, pad_token_id=PAD)
    assert torch.equal(generate_sharing_prompts(model, ids, mask, generation_config=top1), greedy)
    suppressed = sorted(set(greedy[:, ids.shape[1] :].flatten().tolist()))
    options = dict(max_new_tokens=8, do_sample=True, top_k=0, temperature=1.5, pad_token_id=PAD)
    config = GenerationConfig(**options, suppress_tokens=suppressed)
    torch.manual_seed(0)
    first = generate_sharing_prompts(model, ids, mask, generation_config=config)
    assert not torch.isin(first[:, ids.shape[1] :], torch.tensor(suppressed)).any()
    torch.manual_seed(0)
    assert torch.equal(generate_sharing_prompts(model, ids, mask, generation_config=config), first)


def test_inverse_cdf_sampling_follows_the_probabilities():
    """Frequencies of 200k draws against the probabilities (a zero one included), rows of different scales."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [1.0, 3.0, 0.0, 4.0]])  # the second row unnormalised
    generator = torch.Generator().manual_seed(0)
    draws = 100_000
    counts = torch.zeros_like(probs)
    for _ in range(draws // 1000):
        tokens = sample_inverse_cdf(probs.repeat_interleave(1000, dim=0), generator=generator).view(2, 1000)
        counts += torch.nn.functional.one_hot(tokens, 4).sum(dim=1)
    expected = probs / probs.sum(dim=1, keepdim=True)
    assert counts[0, 1] == 0 and counts[1, 2] == 0  # zero-probability tokens
    # Each frequency within 5 binomial standard deviations (sd <= 0.0016 at 100k draws).
    assert torch.allclose(counts / draws, expected, atol=5 * 0.5 / draws**0.5)


@pytest.mark.slow
def test_trainer_generation_equals_trls(tmp_path):
    """`OnlineRLTrainer._generate_single_turn` (shared prefill) against TRL's, same seed, on a real trainer."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from recipes.rl import OnlineRLConfig
    from tests.recipe_rewards import digit_share_reward

    tokenizer = AutoTokenizer.from_pretrained("hub_configs/tiny")
    tokenizer.padding_side = "left"
    model = Llama4ForCausalLM(Llama4TextConfig.from_pretrained("hub_configs/tiny"))
    prompts = ["What is 3 + 4?", "Solve 12 - 5 = x.", "2 * 9 =", "Add 41 and 17, then halve it."]
    args = OnlineRLConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=10,
        use_cpu=True, bf16=False, report_to="none", max_steps=1, beta=0.0, pass_rate_reward="digit_share_reward",
        curriculum_column=None, hard_prompt_sampling=False,
    )  # fmt: skip
    trainer = OnlineRLTrainer(
        model=model, reward_funcs=[digit_share_reward], args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
    )  # fmt: skip
    trainer.generation_config.do_sample = False  # sampled tokens follow the same distribution, not the same stream
    prompt_ids, images, fields = trainer._tokenize_prompts([p for p in prompts[:2] for _ in range(4)])
    assert (
        trainer._can_share_prompts(trainer.model, generation=True) and len({len(ids) for ids in prompt_ids}) == 2
    )  # padded
    torch.manual_seed(1)
    ours = trainer._generate_single_turn(prompt_ids, images, fields, 4)
    torch.manual_seed(1)
    trls = GRPOTrainer._generate_single_turn(trainer, prompt_ids, images, fields, 4)
    assert ours == trls and any(ours[0])
