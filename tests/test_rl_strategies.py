"""The online-RL sampler's strategies (recipes/rl.py): capability mixtures, system instructions per prompt,
continuous pass@k filtering of the prompt pool, their checkpoint state, and the ablation script's smoke run."""

import json
import math
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from recipes.rl import OnlineRLConfig, OnlineRLTrainer, PromptPool, PromptStats, normalize_groups


def fake_pool(counts: dict[str, int], levels=(1, 2, 3)) -> Dataset:
    """Rows in the capability datasets' columns less `completion`, as the RL recipe hands them to the trainer;
    `counts` prompts per capability, levels cycling."""
    rows = []
    for capability, count in counts.items():
        for k in range(count):
            rows.append({
                "prompt": [{"role": "user", "content": f"{capability} question {k}"}],
                "answer": str(k), "capability": capability, "language": "en", "level": levels[k % len(levels)],
                "constraint": "", "system_instruction": "",
            })  # fmt: skip
    dataset = Dataset.from_list(rows)
    return dataset.add_column("prompt_index", list(range(len(dataset))))


class Sampler(OnlineRLTrainer):
    """The trainer's sampling side without a model or a generation backend: the attributes the draw reads, set up
    by the trainer's own `_setup_*` methods. `scripted_rates` stands in for the policy's pass@k."""

    def __init__(self, dataset: Dataset, tmp_path, *, step=0, max_steps=10, scripted_rates=None, **config):
        config = {"per_device_train_batch_size": 8, "num_generations": 2, "curriculum_column": None, **config}
        self.args = OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **config)
        self.train_dataset = dataset
        self.num_generations = self.args.num_generations
        self.accelerator = SimpleNamespace(process_index=0)
        self.state = SimpleNamespace(global_step=step, max_steps=max_steps)
        self._metrics = {"train": defaultdict(list)}
        self.prompt_stats = PromptStats(len(dataset))
        self.prompt_pool = PromptPool(len(dataset))
        column = self.args.curriculum_column
        self._difficulty = torch.tensor(dataset[column], dtype=torch.float64) if column else None
        self._setup_mixture(dataset)
        self._setup_system_instructions(dataset)
        self.scripted_rates = scripted_rates
        self.scored: list[list[int]] = []

    def prompt_pass_rates(self, indices, seed):
        self.scored.append(list(indices))
        return [self.scripted_rates[index] for index in indices]


def capability_counts(rows, num_generations):
    return Counter(row["capability"] for row in rows[::num_generations])


# ---------------------------------------------------------------------------------------------------------------
# Mixture
# ---------------------------------------------------------------------------------------------------------------


def test_normalize_groups_rescales_each_group_to_its_total():
    weights = torch.tensor([1.0, 3.0, 2.0, 0.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 2, 2])
    result = normalize_groups(weights, groups, torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64))
    assert result.tolist() == pytest.approx([0.125, 0.375, 0.2, 0.0, 0.3])
    empty = normalize_groups(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0, 1]), torch.ones(2))
    assert empty.tolist() == [0.0, 1.0]  # an all-zero group stays zero


def test_fixed_mixture_shares_hold_exactly_in_the_weights_and_within_4_sigma_over_many_draws(tmp_path):
    # Unequal pool sizes (150/100/50): the natural shares would be 1/2, 1/3, 1/6.
    dataset = fake_pool({"math": 150, "reasoning": 100, "coding": 50})
    shares = {"math": 0.2, "reasoning": 0.3, "coding": 0.5}
    sampler = Sampler(dataset, tmp_path, mixture_shares=shares, per_device_train_batch_size=8, num_generations=2)
    weights = sampler.draw_weights()
    for name, share in shares.items():
        in_capability = torch.tensor([c == name for c in dataset["capability"]])
        assert weights[in_capability].sum().item() == pytest.approx(share / sum(shares.values()))
    draws, groups = 500, 4
    counts = Counter()
    for _ in range(draws):
        rows = sampler._draw_prompts(groups)
        assert len(rows) == groups * 2 and all(rows[2 * g] == rows[2 * g + 1] for g in range(groups))
        counts += capability_counts(rows, 2)
    total = draws * groups
    for name, share in shares.items():
        sigma = math.sqrt(total * share * (1 - share))
        assert abs(counts[name] - total * share) < 4 * sigma, (name, counts[name], total * share)
    metrics = sampler._metrics["train"]
    assert sum(metrics["mixture/coding/draw_share"]) / draws == pytest.approx(counts["coding"] / total)
    assert metrics["mixture/math/target_share"] == pytest.approx([0.2] * draws)


def test_default_shares_are_equal_and_capabilities_left_out_are_never_drawn(tmp_path):
    dataset = fake_pool({"math": 30, "reasoning": 10, "coding": 20})
    equal = Sampler(dataset, tmp_path).capability_shares()
    assert equal.tolist() == pytest.approx([1 / 3] * 3)
    math_only = Sampler(dataset, tmp_path, mixture_shares={"math": 1.0})
    for _ in range(50):
        assert set(capability_counts(math_only._draw_prompts(4), 2)) == {"math"}


def test_pass_rate_rule_moves_shares_toward_the_weaker_capability(tmp_path):
    dataset = fake_pool({"math": 20, "coding": 20})
    sampler = Sampler(dataset, tmp_path, mixture_rule="pass_rate", mixture_floor=0.1)
    assert sampler.capability_shares().tolist() == pytest.approx([0.5, 0.5])  # no attempts yet: both p = 1/2
    # names sort: coding (indices 20-39) is index 0, math (0-19) index 1. Math 18 of 20 solved, coding 2 of 20.
    sampler.prompt_stats.update(list(range(20)), [1.0] * 18 + [0.0] * 2)
    sampler.prompt_stats.update(list(range(20, 40)), [1.0] * 2 + [0.0] * 18)
    p_math, p_coding = 19 / 22, 3 / 22
    shares = sampler.capability_shares()
    expected = torch.tensor([1 - p_coding, max(1 - p_math, 0.1)])
    assert shares.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert shares[0] > 0.8  # coding, the weaker one, takes most of the batch
    # A capability solved always still keeps the floor.
    sampler.prompt_stats.update(list(range(20)) * 50, [1.0] * 1000)
    shares = sampler.capability_shares()
    assert shares[1].item() == pytest.approx(0.1 / (0.1 + 1 - p_coding))


def test_mixture_composes_with_the_curriculum_and_hard_prompt_weights(tmp_path):
    dataset = fake_pool({"math": 30, "coding": 12})
    sampler = Sampler(dataset, tmp_path, curriculum_column="level", curriculum_fraction=0.5, step=2, max_steps=10)
    assert sampler.difficulty_cap() == 2.0
    level = torch.tensor(dataset["level"])
    capability = dataset["capability"]
    # math prompt 0 solved 4/4 (p = 5/6), math prompt 3 0/4 (1/6): equal p(1-p); math prompt 6 2/4 (1/2).
    sampler.prompt_stats.update([0] * 4 + [3] * 4 + [6] * 4, [1.0] * 4 + [0.0] * 4 + [1.0, 0.0] * 2)
    weights = sampler.draw_weights()
    assert weights[level == 3].sum() == 0  # locked by the curriculum
    for name in ("math", "coding"):
        for k in (1, 2):  # each unlocked level half of its capability's half
            cell = torch.tensor([c == name for c in capability]) & (level == k)
            assert weights[cell].sum().item() == pytest.approx(0.25)
    base = sampler.prompt_weights()
    assert (weights[0] / weights[6]).item() == pytest.approx((base[0] / base[6]).item())  # p(1-p) within a cell
    assert weights[0].item() == pytest.approx(weights[3].item()) and weights[0] < weights[6]


def test_mixture_arguments_are_checked(tmp_path):
    from eval.loading import InputError

    with pytest.raises(InputError, match="mixture_rule"):
        OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", mixture_rule="adaptive")
    with pytest.raises(InputError, match=">= 0"):
        OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", mixture_shares="{math: -1}")
    for bad in ("{math: .nan, coding: 1}", "{math: .inf}", {"math": float("nan")}):  # NaN would reach multinomial
        with pytest.raises(InputError, match="finite number >= 0"):
            OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", mixture_shares=bad)
    with pytest.raises(InputError, match="lacks"):
        Sampler(fake_pool({"math": 4}), tmp_path, mixture_shares={"chemistry": 1.0})
    with pytest.raises(InputError, match="min <= max"):
        OnlineRLConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to="none",
            refilter_min_pass_rate=0.8, refilter_max_pass_rate=0.2,
        )  # fmt: skip


def test_save_steps_inside_a_generation_cycle_is_refused(tmp_path):
    from eval.loading import InputError

    def config(**kwargs):
        return OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)

    config(save_steps=3)  # one generation per step: any checkpoint is at a cycle's end
    config(save_steps=4, num_iterations=2)
    config(save_steps=2, gradient_accumulation_steps=2, steps_per_generation=4)
    with pytest.raises(InputError, match=r"--save_steps 3: .*num_iterations 2 = 2 micro-batches"):
        config(save_steps=3, num_iterations=2)
    with pytest.raises(InputError, match=r"--save_steps 1: .*steps_per_generation 4"):
        config(save_steps=1, gradient_accumulation_steps=2, steps_per_generation=4)
    config(save_steps=1, num_iterations=2, save_strategy="no")


def test_online_rl_refuses_the_math_only_reward_for_capabilities_or_system_instructions(tmp_path):
    from eval.loading import InputError
    from recipes.online_rl import OnlineRLScriptArguments, check_rewards

    def config(**kwargs):
        return OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)

    math_task = OnlineRLScriptArguments()
    check_rewards(math_task, config())  # the arithmetic task with its own rewards
    with pytest.raises(InputError, match="--capabilities: accuracy_reward"):
        check_rewards(OnlineRLScriptArguments(capabilities=["math", "coding"]), config())
    with pytest.raises(InputError, match="--system_instructions sampled: accuracy_reward"):
        check_rewards(math_task, config(system_instructions="sampled"))
    check_rewards(
        OnlineRLScriptArguments(capabilities=["math", "coding"], reward_funcs=["capability_reward"]),
        config(pass_rate_reward="capability_reward", system_instructions="sampled"),
    )


@pytest.mark.parametrize(
    ("flag", "script", "training"),
    [
        ("--refilter_steps", {}, {"refilter_steps": 2}),
        ("--system_instructions", {}, {"system_instructions": "sampled"}),
        ("--capabilities", {"capabilities": ["math"]}, {}),
    ],
)
def test_visual_task_refuses_the_text_only_strategies(tmp_path, flag, script, training):
    from eval.loading import InputError
    from recipes.online_rl import OnlineRLScriptArguments, check_visual

    config = OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **training)
    check_visual(OnlineRLScriptArguments(**script), config)  # the text task takes them
    with pytest.raises(InputError, match=f"^{flag} is not supported with --task visual"):
        check_visual(OnlineRLScriptArguments(task="visual", **script), config)
    check_visual(OnlineRLScriptArguments(task="visual"), OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True))


# ---------------------------------------------------------------------------------------------------------------
# Continuous filtering
# ---------------------------------------------------------------------------------------------------------------


def test_refilter_keeps_exactly_the_prompts_in_the_band_and_only_those_are_drawn(tmp_path):
    dataset = fake_pool({"math": 40, "coding": 40})
    rates = [[0.0, 0.25, 0.5, 0.75, 1.0][k % 5] for k in range(80)]
    sampler = Sampler(
        dataset, tmp_path, scripted_rates=rates, refilter_steps=3, refilter_samples=4,
        refilter_min_pass_rate=0.25, refilter_max_pass_rate=0.75,
    )  # fmt: skip
    assert sampler.refilter_due()
    report = sampler.refilter_pool()
    assert sampler.scored == [list(range(80))]
    expected = torch.tensor([0.25 <= rate <= 0.75 for rate in rates])
    assert torch.equal(sampler.prompt_pool.in_pool, expected)
    assert report["kept"] == 48 and report["too_easy"] == 16 and report["too_hard"] == 16
    assert report["pass_at_k"] == pytest.approx(64 / 80)
    assert sampler.draw_weights()[~expected].sum() == 0
    for _ in range(30):
        for row in sampler._draw_prompts(4)[::2]:
            assert 0.25 <= rates[row["prompt_index"]] <= 0.75
    # Due again only after refilter_steps steps.
    for step, due in ((1, False), (2, False), (3, True)):
        sampler.state.global_step = step
        assert sampler.refilter_due() is due


def test_refilter_scores_a_seeded_sample_and_never_empties_a_capability(tmp_path):
    dataset = fake_pool({"math": 30, "coding": 30})
    rates = [1.0] * 30 + [0.5] * 30  # coding (indices 30-59): medium; math: always solved
    kwargs = dict(scripted_rates=rates, refilter_steps=1, refilter_prompts=20)
    first, second = Sampler(dataset, tmp_path, **kwargs), Sampler(dataset, tmp_path, **kwargs)
    first.refilter_pool()
    second.refilter_pool()
    assert first.scored == second.scored and len(set(first.scored[0])) == 20  # seeded by the refilter counter
    first.refilter_pool()
    assert first.scored[1] != first.scored[0]
    everything = Sampler(dataset, tmp_path, scripted_rates=rates, refilter_steps=1)
    report = everything.refilter_pool()
    math = torch.arange(60) < 30
    # Math would be emptied: it keeps its pool (all of it) rather than vanish from the mixture.
    assert report["groups_left_unchanged"] == 1 and everything.prompt_pool.in_pool.all()
    assert (everything.prompt_pool.pass_rates[math] == 1.0).all()


@pytest.mark.parametrize("column", ["capability", None])
def test_a_capability_whose_unlocked_levels_are_all_filtered_out_falls_back_to_its_unfiltered_weights(
    tmp_path, column
):
    # The pool keeps levels 2-3 only while the curriculum (step 0) unlocks level 1: nothing would be drawable.
    dataset = fake_pool({"math": 12, "coding": 12})
    sampler = Sampler(dataset, tmp_path, curriculum_column="level", mixture_column=column, refilter_steps=5)
    levels = torch.tensor(dataset["level"])
    sampler.prompt_pool.in_pool = levels != 1
    sampler.prompt_pool.in_pool[0] = column is None  # with one group, a math level-1 prompt keeps it drawable
    weights = sampler.draw_weights()
    assert (weights[levels != 1] == 0).all()
    if column is None:  # the pooled group still has a drawable prompt: the filter holds
        assert weights.nonzero().flatten().tolist() == [0]
    else:  # math and coding each fall back to their level-1 prompts
        assert (weights[levels == 1] > 0).all()
        assert sampler._metrics["train"]["refilter/unfiltered_fallbacks"] == [2.0]
    sampler.prompt_pool.in_pool = levels != 1
    assert (sampler.draw_weights()[levels == 1] > 0).all()
    rows = sampler._draw_prompts(2)
    assert {row["level"] for row in rows} == {1}


def test_pool_and_draws_survive_a_save_and_resume(tmp_path):
    dataset = fake_pool({"math": 20, "reasoning": 20})
    rates = [[0.0, 0.5, 1.0][k % 3] for k in range(40)]
    kwargs = dict(scripted_rates=rates, refilter_steps=2, refilter_prompts=24, mixture_rule="pass_rate")
    straight = Sampler(dataset, tmp_path, **kwargs)
    straight.refilter_pool()
    for _ in range(3):
        rows = straight._draw_prompts(4)
        straight.prompt_stats.update([row["prompt_index"] for row in rows], [1.0, 0.0] * 4)
    # What `_save_checkpoint` writes (JSON: NaN for unscored prompts becomes null) and `_load_...` reads back.
    state = json.loads(json.dumps({**straight.prompt_stats.state_dict(), "pool": straight.prompt_pool.state_dict()}))
    resumed = Sampler(dataset, tmp_path, **kwargs)
    resumed.prompt_stats.load_state_dict(state)
    resumed.prompt_pool.load_state_dict(state["pool"])
    assert torch.equal(resumed.prompt_pool.in_pool, straight.prompt_pool.in_pool)
    assert torch.equal(resumed.prompt_pool.pass_rates.isnan(), straight.prompt_pool.pass_rates.isnan())
    for _ in range(2):
        assert resumed._draw_prompts(4) == straight._draw_prompts(4)
        resumed.refilter_pool(), straight.refilter_pool()
        assert resumed.scored[-1] == straight.scored[-1]
        assert torch.equal(resumed.prompt_pool.in_pool, straight.prompt_pool.in_pool)
    with pytest.raises(ValueError, match="same dataset"):
        PromptPool(41).load_state_dict(state["pool"])


# ---------------------------------------------------------------------------------------------------------------
# System instructions
# ---------------------------------------------------------------------------------------------------------------


def test_sampled_system_instructions_come_from_the_train_pool_only_and_cover_it(tmp_path):
    from eval.capabilities import SYSTEM_INSTRUCTIONS

    train = {si.id: si for si in SYSTEM_INSTRUCTIONS["train"]}
    heldout = {si.id for si in SYSTEM_INSTRUCTIONS["heldout"]}
    sampler = Sampler(fake_pool({"math": 40, "coding": 40}), tmp_path, system_instructions="sampled")
    seen = Counter()
    for _ in range(200):
        rows = sampler._draw_prompts(4)
        for g in range(4):
            first, second = rows[2 * g], rows[2 * g + 1]
            assert first["prompt"] == second["prompt"]  # a group shares its prompt, instruction included
            instruction = train[first["system_instruction"]]
            assert first["prompt"][0] == {"role": "system", "content": instruction.text}
            assert first["constraint"] == (
                json.dumps(instruction.constraint, sort_keys=True) if instruction.constraint else ""
            )
            seen[instruction.id] += 1
    assert not set(seen) & heldout and set(seen) == set(train)
    # The guard itself: a held-out instruction reaching the draw is an error, not a silent sample.
    sampler._instructions = SYSTEM_INSTRUCTIONS["heldout"]
    with pytest.raises(AssertionError, match="held-out"):
        sampler._draw_prompts(4)


def test_fixed_instruction_is_always_the_same_and_a_share_leaves_the_rest_bare(tmp_path):
    dataset = fake_pool({"math": 40, "reasoning": 40})
    fixed = Sampler(dataset, tmp_path, system_instructions="fixed", system_instruction_id="wrap-ans")
    ids = {row["system_instruction"] for _ in range(50) for row in fixed._draw_prompts(4)}
    assert ids == {"wrap-ans"}
    default = Sampler(dataset, tmp_path, system_instructions="fixed")
    from eval.capabilities import SYSTEM_INSTRUCTIONS

    assert {row["system_instruction"] for row in default._draw_prompts(4)} == {SYSTEM_INSTRUCTIONS["train"][0].id}
    half = Sampler(dataset, tmp_path, system_instructions="sampled", system_instruction_share=0.5)
    bare = sum(row["prompt"][0]["role"] == "user" for _ in range(100) for row in half._draw_prompts(4)[::2])
    assert abs(bare - 200) < 4 * math.sqrt(400 * 0.25)
    assert all("completion" not in row for row in half._draw_prompts(4))  # no reference answer sneaks in


def test_bare_rows_get_the_instruction_columns_when_the_dataset_lacks_them(tmp_path):
    # TRL takes the reward kwargs from the first row's keys: a bare row without them would drop every constraint.
    dataset = fake_pool({"math": 40, "reasoning": 40}).remove_columns(["constraint", "system_instruction"])
    half = Sampler(dataset, tmp_path, system_instructions="sampled", system_instruction_share=0.5)
    rows = [row for _ in range(20) for row in half._draw_prompts(4)]
    assert {frozenset(row) for row in rows} == {frozenset(rows[0])}
    bare = [row for row in rows if row["prompt"][0]["role"] == "user"]
    assert bare and all(row["constraint"] == "" and row["system_instruction"] == "" for row in bare)


def test_held_out_instructions_are_refused_in_training(tmp_path):
    from eval.loading import InputError

    dataset = fake_pool({"math": 4})
    with pytest.raises(InputError, match="held-out pool"):
        Sampler(dataset, tmp_path, system_instructions="fixed", system_instruction_id="h-lang-es")
    with pytest.raises(InputError, match="train pool has"):
        Sampler(dataset, tmp_path, system_instructions="fixed", system_instruction_id="no-such-id")
    leaky = fake_pool({"math": 4}).map(
        lambda row, k: {"system_instruction": "h-ban-the" if k == 2 else ""}, with_indices=True
    )
    with pytest.raises(InputError, match="held-out system instructions"):
        Sampler(leaky, tmp_path)
    with pytest.raises(InputError, match="only with --system_instructions fixed"):
        OnlineRLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", system_instruction_id="wrap-ans")


# ---------------------------------------------------------------------------------------------------------------
# The real trainer: every strategy on, killed after a checkpoint, resumed
# ---------------------------------------------------------------------------------------------------------------


class SimulatedCrash(Exception):
    pass


def even_length_reward(completions: list, **kwargs) -> list[float]:
    """Solved = an even number of characters: a random tiny model's answers pass about half the time, so the pass@k
    band has prompts on both sides of it."""
    return [float(len(completion[-1]["content"]) % 2 == 0) for completion in completions]


@pytest.mark.slow
def test_trainer_with_every_strategy_resumes_to_the_same_weights_and_pool(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, TrainerCallback

    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from recipes.common import train_resumably

    torch.manual_seed(0)
    policy = Llama4ForCausalLM(Llama4TextConfig.from_pretrained("hub_configs/tiny"))
    tokenizer = AutoTokenizer.from_pretrained("hub_configs/tiny")
    tokenizer.padding_side = "left"
    dataset = fake_pool({"math": 8, "coding": 8}).remove_columns("prompt_index")

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise SimulatedCrash

    def run(output_dir, crash=False):
        args = OnlineRLConfig(
            output_dir=str(output_dir), max_steps=4, save_steps=2, logging_steps=1, learning_rate=1e-3,
            per_device_train_batch_size=8, num_generations=4, max_completion_length=6, beta=0.0, use_cpu=True,
            bf16=False, report_to="none", seed=0, pass_rate_reward="even_length_reward", mixture_rule="pass_rate",
            mixture_shares={"math": 0.5, "coding": 0.5}, system_instructions="sampled", refilter_steps=2,
            refilter_prompts=8, refilter_samples=2, refilter_min_pass_rate=0.5, refilter_max_pass_rate=0.5,
            curriculum_column="level", gradient_checkpointing=False,
        )  # fmt: skip
        model = Llama4ForCausalLM.from_pretrained(tmp_path / "policy") if (tmp_path / "policy").exists() else policy
        trainer = OnlineRLTrainer(
            model=model,
            reward_funcs=[even_length_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        if crash:
            trainer.add_callback(CrashAfterCheckpoint())
        train_resumably(trainer, args)
        trainer.save_model(str(output_dir))
        return trainer

    policy.save_pretrained(tmp_path / "policy")
    straight = run(tmp_path / "straight")
    with pytest.raises(SimulatedCrash):
        run(tmp_path / "resumed", crash=True)
    resumed = run(tmp_path / "resumed")
    assert straight.prompt_pool.refilters == resumed.prompt_pool.refilters == 2  # at steps 0 and 2
    assert 0 < int(straight.prompt_pool.in_pool.sum()) < len(dataset)  # the filter dropped some prompts, not all
    assert straight.prompt_pool.state_dict() == resumed.prompt_pool.state_dict()
    assert straight.prompt_stats.state_dict() == resumed.prompt_stats.state_dict()
    logged = {key for entry in straight.state.log_history for key in entry}
    for key in ("refilter/pool_size", "refilter/kept", "mixture/math/draw_share", "mixture/coding/reward"):
        assert key in logged
    first, second = (
        load_file(tmp_path / "straight/model.safetensors"),
        load_file(tmp_path / "resumed/model.safetensors"),
    )
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, msg=key)
    start = load_file(tmp_path / "policy/model.safetensors")
    assert any(not torch.equal(first[key], start[key]) for key in first)  # training moved the weights


# ---------------------------------------------------------------------------------------------------------------
# The ablation script
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ablation_smoke_runs_every_arm_end_to_end(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_rl_ablation.py"
    spec = importlib.util.spec_from_file_location("bench_rl_ablation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--output_dir", str(tmp_path), "--smoke"])
    assert list(report["arms"]) == ["a", "b", "c", "d", "e"]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["arms"].keys() == report["arms"].keys() and not list(tmp_path.glob("*.tmp"))
    for result in saved["arms"].values():
        for task in bench.TASKS:
            change = result["vs_sft"][task]
            assert change["gained"] + change["lost"] <= result["heldout"][task]["num_problems"] == 4
            assert 0 <= change["p_value"] <= 1
    # The arms trained as configured: math-only batches draw math alone; (e) re-scored its pool.
    logs = {arm: json.loads((tmp_path / f"rl_{arm}" / "stage_results.json").read_text()) for arm in "ae"}
    shares = [e["mixture/math/draw_share"] for e in logs["a"]["log_history"] if "mixture/math/draw_share" in e]
    assert shares and set(shares) == {1.0}
    assert any("refilter/kept" in entry for entry in logs["e"]["log_history"])
    table = (tmp_path / "ablation.md").read_text()
    assert "| e: (d) + continuous filtering |" in table and "instruction_unseen" in table


def test_refilter_scores_prompts_with_sampled_system_instructions_as_training_draws_them(tmp_path, monkeypatch):
    """The re-scoring sees each prompt as a training draw does (a train-pool system message, its constraint passed
    to the reward), and the same refilter seed gives the same instructions."""
    import recipes.rl
    from eval.capabilities import SYSTEM_INSTRUCTIONS

    sent, rewarded = [], []

    def fake_generate(model, tokenizer, prompts, *, num_samples, **kwargs):
        sent.append(prompts)
        return [["answer"] * num_samples for _ in prompts]

    def reward(prompts, completions, constraint, **kwargs):
        rewarded.append(constraint)
        return [1.0] * len(prompts)

    monkeypatch.setattr(recipes.rl, "generate_completions", fake_generate)
    sampler = Sampler(
        fake_pool({"math": 6, "instruction": 6}), tmp_path, system_instructions="sampled",
        system_instruction_share=1.0, refilter_steps=1, refilter_samples=2, pass_rate_reward="reward",
    )  # fmt: skip
    sampler.reward_funcs, sampler.reward_func_names = [reward], ["reward"]
    sampler.model, sampler.processing_class = None, None
    sampler.max_completion_length, sampler.temperature, sampler.top_p = 8, 1.0, 1.0
    sampler.accelerator = SimpleNamespace(unwrap_model=lambda model: model, device=torch.device("cpu"))
    for _ in range(2):
        assert OnlineRLTrainer.prompt_pass_rates(sampler, list(range(12)), seed=5) == [1.0] * 12
    train_texts = {instruction.text for instruction in SYSTEM_INSTRUCTIONS["train"]}
    assert all(prompt[0]["role"] == "system" and prompt[0]["content"] in train_texts for prompt in sent[0])
    assert sent[0] == sent[1] and len(rewarded[0]) == 24 and any(rewarded[0])
