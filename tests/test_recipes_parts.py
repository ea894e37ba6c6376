"""The recipes' building blocks: synthetic task, rewards, cached sampling, judge filter, preference pairs, and the
online-RL trainer's prompt sampling, curriculum and group merging."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoTokenizer

import recipes.sampling as sampling
from recipes.common import accuracy_reward, format_reward, last_complete_checkpoint, write_json_atomic
from recipes.judge import filter_hard, pass_rates
from recipes.preferences import preference_pairs, total_reward
from recipes.rl import OnlineRLTrainer, PromptStats
from recipes.synthetic import LANGUAGES, arithmetic_problems, pretraining_corpus


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "hub_configs" / "tiny")


def test_synthetic_task_is_deterministic_balanced_and_splits_are_disjoint():
    train = arithmetic_problems("train", 240)
    assert train.to_list() == arithmetic_problems("train", 240).to_list()
    test = arithmetic_problems("test", 120)
    train_questions = {row["prompt"][0]["content"] for row in arithmetic_problems("train", 3000)}
    assert not train_questions & {row["prompt"][0]["content"] for row in test}
    assert sorted(set(train["language"])) == sorted(LANGUAGES) and sorted(set(train["level"])) == [1, 2, 3]
    for row in train:
        solution = row["completion"][0]["content"]
        assert solution.endswith(f"\\boxed{{{row['answer']}}}.")
        # The worked steps really compute the answer.
        last_step = solution.split("=")[-2:]
        assert last_step[1].strip().startswith(row["answer"])
        assert int(row["answer"]) >= 0


def test_synthetic_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        arithmetic_problems("validation", 4)
    with pytest.raises(ValueError, match="unknown languages"):
        arithmetic_problems("train", 4, languages=["xx"])
    with pytest.raises(ValueError, match="ask for fewer"):
        arithmetic_problems("test", 5000, levels=[1], languages=["en"])


def test_solutions_tokenize_alike_in_plain_text_and_in_the_chat_template(tiny_tokenizer):
    # A model pretrained on plain "Question: ... Answer: ..." text must see the same number tokens when the chat
    # template puts the answer right after "\n\n" (a leading "8" and an in-text " 8" are different tokens).
    for row in arithmetic_problems("train", 8):
        solution = row["completion"][0]["content"]
        plain = tiny_tokenizer.tokenize(f"Answer: {solution}")
        chat = tiny_tokenizer.tokenize(
            tiny_tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False).split("\n\n")[-1]
        )
        first_number = [next(token for token in tokens if token.lstrip("Ġ").isdigit()) for tokens in (plain, chat)]
        assert first_number[0].startswith("Ġ") and first_number[0] == first_number[1], first_number


def test_every_chat_problem_fits_in_one_attention_chunk_of_the_pipeline_model(tiny_tokenizer):
    # Past a chunk edge three of the four layers no longer see the question: with 128-token chunks most two-step
    # German and French problems crossed one, and their accuracy after SFT was a third of English's.
    config = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "configs" / "pretrain_tiny.yaml").read_text())
    chunk = config["model_config_overrides"]["attention_chunk_size"]
    # Two-step problems are the longest.
    problems = (
        arithmetic_problems("train", 600, levels=[3]).to_list()
        + arithmetic_problems("test", 200, levels=[3]).to_list()
    )
    longest = max(
        len(
            tiny_tokenizer(
                tiny_tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False),
                add_special_tokens=False,
            )["input_ids"]
        )
        for row in problems
    )
    assert 140 < longest <= chunk, (longest, chunk)


def test_pretraining_corpus_mixes_plain_and_chat_documents(tiny_tokenizer):
    plain = pretraining_corpus(tiny_tokenizer, 20)["text"]
    assert all(text.startswith("Question: ") and "\nAnswer: " in text for text in plain)
    mixed = pretraining_corpus(tiny_tokenizer, 20, chat_fraction=0.25)["text"]
    chat = [text for text in mixed if text.startswith("<|header_start|>user")]
    assert len(chat) == 5 and not any(text.startswith(tiny_tokenizer.bos_token) for text in mixed)
    assert all(text.endswith("<|eot|>") for text in chat)
    with pytest.raises(ValueError, match="chat_fraction"):
        pretraining_corpus(tiny_tokenizer, 4, chat_fraction=1.5)


def test_rewards_grade_answers_and_format():
    completions = [
        [{"role": "assistant", "content": "3 + 5 = 8. The final answer is \\boxed{8}."}],
        [{"role": "assistant", "content": "3 + 5 = 9. The final answer is \\boxed{9}."}],
        [{"role": "assistant", "content": "\\boxed{8} and then \\boxed{8}"}],
        [{"role": "assistant", "content": "it is 7"}],
    ]
    assert accuracy_reward(completions, answer=["8"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0]
    assert total_reward(accuracy_reward, format_reward)(completions, ["8"] * 4) == [2.0, 1.0, 1.0, 0.0]


def test_judge_filter_keeps_hard_prompts_and_reports():
    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"], "level": [1, 1, 2]})
    samples = [["\\boxed{1}", "\\boxed{1}"], ["\\boxed{2}", "\\boxed{0}"], ["x", "y"]]
    rates = pass_rates(samples, data["answer"], lambda text, gold: text == f"\\boxed{{{gold}}}")
    assert rates == [1.0, 0.5, 0.0]
    kept, report = filter_hard(data, rates, threshold=0.75)
    assert kept["prompt"] == ["b", "c"]
    assert report["kept"] == 2 and report["kept_by_level"] == {"1": "1/2", "2": "1/1"}


def test_cached_samples_resume_without_regenerating(tmp_path, monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, *, seed, num_samples, **kwargs):
        calls.append(list(prompts))
        return [[f"{p}-{seed}-{j}" for j in range(num_samples)] for p in prompts]

    monkeypatch.setattr(sampling, "generate_completions", fake_generate)
    model = torch.nn.Linear(2, 2)
    prompts = [f"p{i}" for i in range(5)]
    kwargs = dict(num_samples=2, cache_dir=tmp_path, chunk_size=2)
    first = sampling.cached_samples(model, None, prompts, **kwargs)
    assert len(calls) == 3 and first[4] == [f"p4-{2 * 1_000_003}-0", f"p4-{2 * 1_000_003}-1"]
    # A crash after the first chunk: the rerun generates only the missing chunks, with the same seeds.
    cache = next(tmp_path.iterdir())
    for path in sorted(cache.glob("chunk-*"))[1:]:
        path.unlink()
    calls.clear()
    assert sampling.cached_samples(model, None, prompts, **kwargs) == first
    assert calls == [["p2", "p3"], ["p4"]]
    # Other weights: another cache key, so nothing stale is served.
    with torch.no_grad():
        model.weight.add_(1.0)
    calls.clear()
    sampling.cached_samples(model, None, prompts, **kwargs)
    assert len(calls) == 3


def test_preference_pairs_take_best_and_worst_samples():
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]})
    data = data.add_column("answer", ["1", "2"])
    samples = [["\\boxed{7}", "\\boxed{1}", "\\boxed{1}"], ["\\boxed{2}", "\\boxed{2}", "\\boxed{2}"]]
    pairs, report = preference_pairs(data, samples, accuracy_reward)
    assert report == {"prompts": 2, "pairs": 1}
    assert pairs[0]["chosen"][0]["content"] == "\\boxed{1}" and pairs[0]["rejected"][0]["content"] == "\\boxed{7}"


def test_preference_pairs_hand_the_reward_the_rows_columns_as_trl_does():
    # capability_reward needs each answer's capability and constraint: without them every answer is graded as math.
    prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    data = Dataset.from_dict({
        "prompt": prompts, "answer": ["1", "2"], "capability": ["coding", "math"], "constraint": ["", "{}"],
        "completion": [[{"role": "assistant", "content": "ref"}]] * 2,
    })  # fmt: skip
    seen = []

    def reward(completions, answer, **kwargs):
        seen.append(kwargs)
        return [float(k) for k in range(len(completions))]

    samples = [["a", "b"], ["c", "d"]]
    pairs, _ = preference_pairs(data, samples, total_reward(reward))
    assert len(pairs) == 2
    assert seen[0] == {"prompts": [prompts[0]] * 2, "capability": ["coding"] * 2, "constraint": [""] * 2}
    assert seen[1]["capability"] == ["math"] * 2 and seen[1]["constraint"] == ["{}"] * 2


def test_prompt_stats_pass_rates_and_state_round_trip():
    stats = PromptStats(3)
    assert stats.pass_rates().tolist() == [0.5, 0.5, 0.5]  # Beta(1, 1) prior
    stats.update([0, 0, 1, 0], [1.0, 1.0, 0.0, 1.0])
    assert stats.pass_rates().tolist() == pytest.approx([4 / 5, 1 / 3, 0.5])
    restored = PromptStats(3)
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert torch.equal(restored.pass_rates(), stats.pass_rates())
    with pytest.raises(ValueError, match="same dataset"):
        PromptStats(4).load_state_dict(stats.state_dict())


def test_last_complete_checkpoint_skips_half_written_ones(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        if complete:
            write_json_atomic(folder / "trainer_state.json", {"global_step": step})
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("damage", ["truncated_weights", "deleted_weights", "corrupt_state"])
def test_last_complete_checkpoint_passes_over_a_damaged_one(damage, tmp_path):
    for step in (5, 10):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
        write_json_atomic(folder / "trainer_state.json", {"global_step": step})
    newest = tmp_path / "checkpoint-10"
    if damage == "truncated_weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "deleted_weights":
        (newest / "model.safetensors").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"global_step": 1')
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


def _rl_trainer_stub(difficulty, *, step=0, max_steps=10, balance=True, hard=True):
    # The sampling methods read only these attributes; a real trainer needs a model and is covered by the resume test.
    stub = SimpleNamespace(
        args=SimpleNamespace(
            hard_prompt_sampling=hard, min_prompt_weight=0.02, curriculum_fraction=0.5, balance_difficulty=balance
        ),
        prompt_stats=PromptStats(len(difficulty)),
        _difficulty=torch.tensor(difficulty, dtype=torch.float64),
        state=SimpleNamespace(global_step=step, max_steps=max_steps),
    )
    stub.difficulty_cap = lambda: OnlineRLTrainer.difficulty_cap(stub)
    return stub


def test_curriculum_cap_rises_over_the_first_fraction_of_training():
    caps = [OnlineRLTrainer.difficulty_cap(_rl_trainer_stub([1, 2, 3], step=s)) for s in range(11)]
    assert caps == [1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3]  # 3 levels reached by step 5 of 10 (curriculum_fraction 0.5)


def test_prompt_weights_favour_prompts_neither_always_nor_never_solved():
    stub = _rl_trainer_stub([1, 1, 1, 2], step=10, balance=False)
    # prompt 0 solved 10/10, prompt 1 5/10, prompt 2 0/10, prompt 3 never drawn
    stub.prompt_stats.update([0] * 10 + [1] * 10 + [2] * 10, [1.0] * 10 + [0.0, 1.0] * 5 + [0.0] * 10)
    weights = OnlineRLTrainer.prompt_weights(stub)
    assert weights.tolist() == pytest.approx([11 / 144 + 0.02, 0.25 + 0.02, 11 / 144 + 0.02, 0.25 + 0.02])
    uniform = OnlineRLTrainer.prompt_weights(_rl_trainer_stub([1, 1, 1, 2], step=10, balance=False, hard=False))
    assert uniform.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_prompt_weights_lock_levels_above_the_cap_and_balance_the_open_ones():
    difficulty = [1, 1, 1, 1, 2, 3]
    assert OnlineRLTrainer.prompt_weights(_rl_trainer_stub(difficulty, step=0)).tolist()[4:] == [0.0, 0.0]
    balanced = OnlineRLTrainer.prompt_weights(_rl_trainer_stub(difficulty, step=10))
    level = torch.tensor(difficulty)
    assert [balanced[level == k].sum().item() for k in (1, 2, 3)] == pytest.approx([1.0, 1.0, 1.0])
    unbalanced = OnlineRLTrainer.prompt_weights(_rl_trainer_stub(difficulty, step=10, balance=False))
    assert unbalanced[level == 1].sum() == pytest.approx(4 * unbalanced[level == 3].sum())


def test_concat_groups_repads_prompts_left_and_completions_right():
    stub = SimpleNamespace(
        num_generations=2,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        accelerator=SimpleNamespace(gather=lambda tensor: tensor.reshape(-1)),
    )
    first = {  # two groups of two rows; prompts 2 wide, completions 1 wide
        "prompt_ids": torch.tensor([[0, 5], [0, 5], [6, 7], [6, 7]]),
        "prompt_mask": torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]]),
        "completion_ids": torch.tensor([[8], [9], [8], [9]]),
        "completion_mask": torch.ones(4, 1, dtype=torch.long),
        "advantages": torch.tensor([1.0, -1.0, 0.0, 0.0]),
        "old_per_token_logps": None,
        "num_items_in_batch": torch.tensor(4),
    }
    second = {  # one group; prompt 3 wide, completions 2 wide
        "prompt_ids": torch.tensor([[1, 2, 3], [1, 2, 3]]),
        "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": torch.tensor([[4, 4], [4, 0]]),
        "completion_mask": torch.tensor([[1, 1], [1, 0]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "old_per_token_logps": None,
        "num_items_in_batch": torch.tensor(3),
    }
    merged = OnlineRLTrainer._concat_groups(stub, [(first, [0]), (second, [0])])
    assert merged["prompt_ids"].tolist() == [[0, 0, 5], [0, 0, 5], [1, 2, 3], [1, 2, 3]]
    assert merged["prompt_mask"].tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]
    assert merged["completion_ids"].tolist() == [[8, 0], [9, 0], [4, 4], [4, 0]]
    assert merged["completion_mask"].tolist() == [[1, 0], [1, 0], [1, 1], [1, 0]]
    assert merged["advantages"].tolist() == [1.0, -1.0, 0.5, -0.5]
    assert merged["old_per_token_logps"] is None and merged["num_items_in_batch"].item() == 5


def _refill_stub(signal: int, *, num_generations=2, max_refill_rounds=2, refill_oversample=1.5):
    """An OnlineRLTrainer whose generation is faked: of every 4 groups drawn, the first `signal` have signal."""
    from collections import defaultdict

    stub = OnlineRLTrainer.__new__(OnlineRLTrainer)
    stub.num_generations, stub.model = num_generations, SimpleNamespace(training=True)
    stub.args = SimpleNamespace(
        refilter_steps=0, filter_zero_variance_groups=True, max_refill_rounds=max_refill_rounds,
        refill_oversample=refill_oversample,
    )  # fmt: skip
    stub._metrics, stub.draws = {"train": defaultdict(list)}, []
    stub.refilter_due, stub._draws_prompts, stub.difficulty_cap = (lambda: False), (lambda: True), (lambda: None)
    stub.prompt_stats = SimpleNamespace(pass_rates=lambda: torch.zeros(1))
    stub._max_over_processes = lambda value: value
    stub._concat_groups = lambda parts: parts

    def draw(num_groups):
        stub.draws.append(num_groups)
        return [{}] * (num_groups * num_generations)

    def score(rows):
        groups = len(rows) // num_generations
        return {"groups": groups}, torch.arange(groups) % 4 < signal

    stub._draw_prompts, stub._score = draw, score
    return stub


@pytest.mark.parametrize(
    ("signal", "oversample", "draws", "kept"),
    [
        (3, 1.5, [16, 8], 16),  # 12 of 16 with signal: 4 missing at 3/4 -> 1.5 * 4 / 0.75 = 8 groups
        (3, 0.0, [16, 16], 16),  # refill_oversample 0: a full batch each time
        (1, 1.5, [16, 16, 16], 12),  # 12 missing at 1/4: capped at a full batch; still short after 2 refills
    ],
)
def test_refills_draw_what_the_missing_groups_need(signal, oversample, draws, kept):
    stub = _refill_stub(signal, refill_oversample=oversample)
    parts = OnlineRLTrainer._generate_and_score_completions(stub, [{}] * 32)  # 16 groups of 2
    assert stub.draws == draws
    with_signal = sum(len(take) for _, take in parts[: len(draws)])
    assert with_signal == kept and sum(len(take) for _, take in parts) == 16  # padded with silent groups
    assert stub._metrics["train"]["adaptive_filter/batch_signal_fraction"] == [kept / 16]


def test_paired_change_is_the_exact_sign_test():
    from recipes.pipeline import paired_change

    before, after = [0] * 10 + [1] * 3 + [1] * 7, [1] * 10 + [0] * 3 + [1] * 7
    change = paired_change(before, after)
    assert (change["gained"], change["lost"]) == (10, 3)
    assert change["p_value"] == pytest.approx(0.0922852, abs=1e-6)  # scipy.stats.binomtest(3, 13).pvalue
    assert paired_change([1, 0], [1, 0])["p_value"] == 1.0
    with pytest.raises(ValueError, match="different held-out sets"):
        paired_change([1, 0], [1])
