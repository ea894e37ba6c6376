"""The codistillation trainer (recipes/trainers): its loss against a hand computation, online and precomputed
teachers, sequence-level distillation, tokenizer and token checks, the recipe script, and 2-process training."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from recipes.trainers import (
    CoDistillationConfig,
    CoDistillationTrainer,
    TeacherLogitsStore,
    TeacherTopK,
    check_same_tokenizer,
    codistillation_loss,
    generate_teacher_targets,
    soft_weight_at,
    tokenize_like_sft,
    write_teacher_topk,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "hub_configs" / "tiny"
TEACHER_SHAPE = dict(hidden_size=96, head_dim=24)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY)


def tiny(**overrides) -> Llama4ForCausalLM:
    return Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY, **overrides))


def sums_dataset(pairs=((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9))) -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
            "completion": [{"role": "assistant", "content": f"\\boxed{{{a + b}}}"}],
            "answer": str(a + b),
        }
        for a, b in pairs
    ]
    return Dataset.from_list(rows)


def config(tmp_path, **overrides) -> CoDistillationConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0, max_length=64,
        disable_tqdm=True,
    )  # fmt: skip
    return CoDistillationConfig(**{**defaults, **overrides})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def moved(model, before) -> bool:
    return any(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------ the loss by hand


def log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_z for x in scaled]


def kl(p_log: list[float], q_log: list[float]) -> float:
    return sum(math.exp(p) * (p - q) for p, q in zip(p_log, q_log))


STUDENT = [[0.2, -1.0, 0.5, 1.5], [1.0, 0.0, -0.5, 0.3], [0.0, 2.0, 1.0, -1.0], [0.3, 0.3, 0.3, 0.3]]
TEACHER = [[1.0, 0.0, 3.0, -2.0], [0.5, 2.5, 0.0, 0.0], [-1.0, 0.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0]]
# labels[j + 1] is predicted at position j; -100 at position 2 (a prompt token) leaves positions 0 and 2 as targets.
LABELS = [-100, 2, -100, 3]


def hand_loss(weighting: str, soft_weight: float, temperature: float, threshold: float = 0.0) -> dict[str, float]:
    totals = dict(loss=0.0, soft=0.0, hard=0.0, weight=0.0, teacher_correct=0.0)
    targets = [(j, LABELS[j + 1]) for j in range(3) if LABELS[j + 1] != -100]
    for j, y in targets:
        soft = temperature**2 * kl(log_softmax(TEACHER[j], temperature), log_softmax(STUDENT[j], temperature))
        hard = -log_softmax(STUDENT[j])[y]
        probs = [math.exp(x) for x in log_softmax(TEACHER[j])]
        correct = max(range(4), key=lambda v: TEACHER[j][v]) == y
        if weighting == "schedule":
            w = soft_weight
        elif weighting == "adaptive":
            w = soft_weight * (1 - max(p for v, p in enumerate(probs) if v != y))
        else:
            w = soft_weight * correct * probs[y] * (probs[y] >= threshold)
        totals["loss"] += w * soft + (1 - w) * hard
        totals["soft"] += soft
        totals["hard"] += hard
        totals["weight"] += w
        totals["teacher_correct"] += correct
    return {k: v / len(targets) for k, v in totals.items()}


def as_batch(rows):
    return torch.tensor([rows], dtype=torch.float32)


@pytest.mark.parametrize(
    "weighting, soft_weight, temperature, threshold",
    [
        ("schedule", 0.7, 1.0, 0.0),
        ("schedule", 0.3, 2.0, 0.0),
        ("adaptive", 0.9, 2.0, 0.0),
        ("adaptive_argmax", 0.9, 2.0, 0.0),
        ("adaptive_argmax", 1.0, 1.0, 0.9),
    ],
)
def test_loss_matches_hand_computation(weighting, soft_weight, temperature, threshold):
    student = as_batch(STUDENT).requires_grad_()
    result = codistillation_loss(
        student, torch.tensor([LABELS]), soft_weight=soft_weight, weighting=weighting, temperature=temperature,
        teacher_logits=as_batch(TEACHER), confidence_threshold=threshold,
    )  # fmt: skip
    expected = hand_loss(weighting, soft_weight, temperature, threshold)
    assert result.num_tokens.item() == 2
    assert result.loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    assert result.soft_sum.item() / 2 == pytest.approx(expected["soft"], rel=1e-5)  # T^2 included
    assert result.hard_sum.item() / 2 == pytest.approx(expected["hard"], rel=1e-5)
    assert result.weight_sum.item() / 2 == pytest.approx(expected["weight"], rel=1e-6)
    assert result.teacher_correct.item() / 2 == expected["teacher_correct"]
    result.loss.backward()
    # Masked positions (1 and 3: labels -100 follow them, or nothing does) get no gradient.
    assert student.grad[0, 1].abs().sum() == 0 and student.grad[0, 3].abs().sum() == 0
    assert student.grad[0, 0].abs().sum() > 0


def test_adaptive_weights_follow_the_teachers_confidence_in_another_token():
    # Position 0: the teacher puts p = 0.84 on token 2. Label 2 (right and sure): w = 1 - (the best other token's
    # p); label 0 (confidently wrong): w = 1 - 0.84, and adaptive_argmax gives 0.
    teacher, probs = as_batch(TEACHER), [math.exp(x) for x in log_softmax(TEACHER[0])]
    for label, expected in ((2, 1 - sorted(probs)[-2]), (0, 1 - max(probs))):
        labels = torch.tensor([[-100, label, -100, -100]])
        result = codistillation_loss(as_batch(STUDENT), labels, soft_weight=1.0, teacher_logits=teacher)
        assert result.weight_sum.item() == pytest.approx(expected, rel=1e-6)
    strict = codistillation_loss(
        as_batch(STUDENT), labels, soft_weight=1.0, weighting="adaptive_argmax", teacher_logits=teacher
    )
    assert strict.teacher_correct.item() == 0 and strict.weight_sum.item() == 0
    assert max(probs) > 0.8 and expected < 0.2


def test_normalised_by_num_items_in_batch():
    kwargs = dict(soft_weight=0.5, weighting="schedule", teacher_logits=as_batch(TEACHER))
    own = codistillation_loss(as_batch(STUDENT), torch.tensor([LABELS]), **kwargs).loss
    shared = codistillation_loss(as_batch(STUDENT), torch.tensor([LABELS]), num_items_in_batch=8, **kwargs).loss
    assert shared.item() == pytest.approx(own.item() * 2 / 8, rel=1e-6)


def topk_of(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
    values, ids = torch.log_softmax(teacher_logits / temperature, -1).topk(k, -1)
    following = torch.cat([labels[:, 1:], labels[:, -1:]], 1).clamp(min=0)
    plain = torch.log_softmax(teacher_logits, -1)
    target = plain.gather(-1, following[..., None])[..., 0]
    return TeacherTopK(ids, values, target, plain.gather(-1, ids[..., :2]))


def test_topk_soft_loss_is_the_kl_with_a_tail_bucket():
    labels = torch.tensor([LABELS])
    T = 2.0
    topk = topk_of(as_batch(TEACHER), labels, k=2, temperature=T)
    result = codistillation_loss(
        as_batch(STUDENT), labels, soft_weight=1.0, weighting="schedule", temperature=T, teacher_topk=topk
    )
    expected = 0.0
    for j in (0, 2):
        t, s = log_softmax(TEACHER[j], T), log_softmax(STUDENT[j], T)
        top = sorted(range(4), key=lambda v: -t[v])[:2]
        rest = [v for v in range(4) if v not in top]
        t_tail = sum(math.exp(t[v]) for v in rest)
        s_tail = sum(math.exp(s[v]) for v in rest)
        expected += T**2 * (sum(math.exp(t[v]) * (t[v] - s[v]) for v in top) + t_tail * math.log(t_tail / s_tail))
    assert result.loss.item() == pytest.approx(expected / 2, rel=1e-5)
    # With every token but one stored, the bucketed KL is the full KL.
    full = codistillation_loss(
        as_batch(STUDENT), labels, soft_weight=1.0, weighting="adaptive", temperature=T,
        teacher_logits=as_batch(TEACHER),
    )  # fmt: skip
    wide = codistillation_loss(
        as_batch(STUDENT), labels, soft_weight=1.0, weighting="adaptive", temperature=T,
        teacher_topk=topk_of(as_batch(TEACHER), labels, k=3, temperature=T),
    )  # fmt: skip
    assert wide.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert wide.weight_sum.item() == pytest.approx(full.weight_sum.item(), rel=1e-6)
    for weighting in ("adaptive", "adaptive_argmax"):  # the weights need only the stored top-2 and the label
        kwargs = dict(soft_weight=0.8, weighting=weighting, temperature=T)
        narrow = codistillation_loss(as_batch(STUDENT), labels, teacher_topk=topk, **kwargs)
        full = codistillation_loss(as_batch(STUDENT), labels, teacher_logits=as_batch(TEACHER), **kwargs)
        assert narrow.weight_sum.item() == pytest.approx(full.weight_sum.item(), rel=1e-6)


def test_soft_weight_schedules():
    assert soft_weight_at(0.0, 1.0, 0.5, "linear") == 1.0
    assert soft_weight_at(1.0, 1.0, 0.5, "linear") == 0.5
    assert soft_weight_at(0.5, 1.0, 0.5, "cosine") == pytest.approx(0.75)
    assert soft_weight_at(0.7, 0.8, 0.1, "constant") == 0.8
    with pytest.raises(ValueError, match="weighting"):
        CoDistillationConfig(output_dir="x", weighting="magic", use_cpu=True, bf16=False)


# ------------------------------------------------------------------------------------------------ online teacher


def test_online_teacher_trains_the_student_and_logs_both_losses(tokenizer, tmp_path):
    torch.manual_seed(0)
    student, teacher = tiny(), tiny(**TEACHER_SHAPE)
    student_before, teacher_before = snapshot(student), snapshot(teacher)
    args = config(
        tmp_path, max_steps=3, weighting="schedule", soft_weight_start=0.6, soft_weight_end=0.2,
        router_aux_loss_coef=0.01,
    )  # fmt: skip
    trainer = CoDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=sums_dataset(), processing_class=tokenizer
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    assert [log["soft_weight_schedule"] for log in logs] == pytest.approx([0.6, 0.4, 0.2])
    for log in logs:
        # One micro-batch per step: the logged loss is exactly the logged parts put together.
        w = log["soft_weight"]
        assert w == pytest.approx(log["soft_weight_schedule"])
        assert log["loss"] == pytest.approx(
            w * log["soft_loss"] + (1 - w) * log["hard_loss"] + 0.01 * log["aux_loss"], rel=1e-4
        )
        assert 0 <= log["teacher_token_accuracy"] <= 1 and log["soft_loss"] > 0
    assert moved(student, student_before) and not moved(teacher, teacher_before)
    assert not trainer.teacher_model.training


def test_online_teacher_from_a_path_with_adaptive_weights(tokenizer, tmp_path):
    teacher = tiny(**TEACHER_SHAPE)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    args = config(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"), temperature=2.0)
    trainer = CoDistillationTrainer(model=tiny(), args=args, train_dataset=sums_dataset(), processing_class=tokenizer)
    assert isinstance(trainer.teacher_model, Llama4ForCausalLM)  # ours, not transformers' dense built-in
    trainer.train()
    log = [log for log in trainer.state.log_history if "loss" in log][-1]
    # Adaptive: w = s(t) * (1 - the teacher's largest probability on another token) is in [0, s(t)].
    assert 0 < log["soft_weight"] <= log["soft_weight_schedule"]


def test_tokenizer_or_vocabulary_mismatch_is_a_clear_error(tokenizer, tmp_path):
    other = AutoTokenizer.from_pretrained(TINY)
    other.add_tokens(["<|not_in_the_student|>"])
    with pytest.raises(ValueError, match="tokenize identically"):
        check_same_tokenizer(tokenizer, other)
    with pytest.raises(ValueError, match="fingerprint"):
        CoDistillationTrainer(
            model=tiny(), teacher_model=tiny(), teacher_processing_class=other, args=config(tmp_path),
            train_dataset=sums_dataset(), processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="share the tokenizer and vocabulary"):
        CoDistillationTrainer(
            model=tiny(), teacher_model=tiny(vocab_size=1100), args=config(tmp_path),
            train_dataset=sums_dataset(), processing_class=tokenizer,
        )  # fmt: skip
    with pytest.raises(ValueError, match="exactly one teacher"):
        CoDistillationTrainer(
            model=tiny(), args=config(tmp_path), train_dataset=sums_dataset(), processing_class=tokenizer
        )


# ------------------------------------------------------------------------------------------------ precomputed teacher


def test_precomputed_topk_written_read_back_and_trained_on(tokenizer, tmp_path):
    teacher = tiny(**TEACHER_SHAPE)
    dataset, store_dir = sums_dataset(), tmp_path / "logits"
    args = config(tmp_path, teacher_logits_path=str(store_dir), temperature=2.0)
    counts = write_teacher_topk(
        teacher, tokenizer, dataset, store_dir, args=args, top_k=8, temperature=2.0, shard_size=3
    )
    assert counts == {"written": 3, "skipped": 0, "num_rows": 8}
    store = TeacherLogitsStore(store_dir)
    rows = tokenize_like_sft(dataset, tokenizer, args)["input_ids"]
    ids = torch.tensor([rows[5]])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    stored = store.row(store.find(rows[5]))
    values, indices = torch.log_softmax(logits / 2.0, -1).topk(8, -1)
    assert stored["input_ids"].tolist() == rows[5]
    assert torch.equal(stored["topk_ids"], indices[0])
    torch.testing.assert_close(stored["topk_logprobs"], values[0])
    plain = torch.log_softmax(logits, -1)[0]
    torch.testing.assert_close(stored["target_logprobs"][:-1], plain[:-1].gather(-1, ids[0, 1:, None])[:, 0])
    torch.testing.assert_close(stored["top2_logprobs"], plain.gather(-1, indices[0, :, :2]))

    student = tiny()
    before = snapshot(student)
    trainer = CoDistillationTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.teacher_model is None
    trainer.train()
    log = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert log["soft_loss"] > 0 and 0 <= log["teacher_token_accuracy"] <= 1
    assert moved(student, before)


def test_precomputed_writer_resumes_and_is_atomic(tokenizer, tmp_path):
    teacher, dataset, store_dir = tiny(), sums_dataset(), tmp_path / "logits"
    write_teacher_topk(teacher, tokenizer, dataset, store_dir, top_k=4, shard_size=3)
    kept = (store_dir / "shard-00000.safetensors").stat().st_mtime_ns
    original = (store_dir / "shard-00002.safetensors").read_bytes()
    # A writer killed mid-shard leaves only a temporary file; the store refuses to load without the shard.
    (store_dir / "shard-00002.safetensors").rename(store_dir / "shard-00002.tmp")
    with pytest.raises(ValueError, match="incomplete.*resumes"):
        TeacherLogitsStore(store_dir)
    counts = write_teacher_topk(teacher, tokenizer, dataset, store_dir, top_k=4, shard_size=3)
    assert counts == {"written": 1, "skipped": 2, "num_rows": 8}
    assert (store_dir / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert (store_dir / "shard-00002.safetensors").read_bytes() == original
    with pytest.raises(ValueError, match="other settings.*top_k"):
        write_teacher_topk(teacher, tokenizer, dataset, store_dir, top_k=5, shard_size=3)
    with pytest.raises(ValueError, match="other settings.*data_fingerprint"):  # other rows, same count
        write_teacher_topk(
            teacher, tokenizer, sums_dataset([(9, k) for k in range(8)]), store_dir, top_k=4, shard_size=3
        )
    with pytest.raises(ValueError, match="other settings.*teacher_fingerprint"):  # a retrained teacher
        write_teacher_topk(tiny(), tokenizer, dataset, store_dir, top_k=4, shard_size=3)


def test_precomputed_token_and_tokenizer_mismatches_are_clear_errors(tokenizer, tmp_path):
    store_dir = tmp_path / "logits"
    write_teacher_topk(tiny(), tokenizer, sums_dataset(), store_dir, top_k=4)
    args = config(tmp_path, teacher_logits_path=str(store_dir))
    other_rows = sums_dataset(((1, 2), (9, 9)))  # (9, 9) was never run through the teacher
    with pytest.raises(ValueError, match="1 of 2 train rows have token ids that match no row"):
        CoDistillationTrainer(model=tiny(), args=args, train_dataset=other_rows, processing_class=tokenizer)
    other = AutoTokenizer.from_pretrained(TINY)
    other.add_tokens(["<|not_in_the_student|>"])
    with pytest.raises(ValueError, match="written with tokenizer"):
        CoDistillationTrainer(model=tiny(), args=args, train_dataset=sums_dataset(), processing_class=other)
    with pytest.raises(ValueError, match="temperature"):
        CoDistillationTrainer(
            model=tiny(), args=config(tmp_path, teacher_logits_path=str(store_dir), temperature=3.0),
            train_dataset=sums_dataset(), processing_class=tokenizer,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ sequence level


def test_sequence_level_distillation_trains_on_the_teachers_completions(tokenizer, tmp_path):
    from eval.generation import generate_completions

    teacher, dataset = tiny(**TEACHER_SHAPE), sums_dataset()
    expected = generate_completions(teacher, tokenizer, list(dataset["prompt"]), max_new_tokens=6, progress=False)
    targets = generate_teacher_targets(teacher, tokenizer, dataset, max_new_tokens=6)
    assert [row["completion"][0]["content"] for row in targets] == [samples[0] for samples in expected]
    assert targets["teacher_answer_correct"] == [False] * 8  # an untrained teacher
    gold = generate_teacher_targets(teacher, tokenizer, dataset, max_new_tokens=6, keep_gold_when_wrong=True)
    assert gold["completion"] == dataset["completion"]

    args = config(tmp_path, seq_kd=True, seq_kd_max_new_tokens=6)
    trainer = CoDistillationTrainer(
        model=tiny(), teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    completion_ids = [
        i
        for i, label in zip(trainer.train_dataset[0]["input_ids"], trainer.train_dataset[0]["labels"])
        if label != -100
    ]
    assert tokenizer.decode(completion_ids).startswith(expected[0][0].strip()[:3])
    trainer.train()
    assert trainer.state.global_step == 2


# ------------------------------------------------------------------------------------------------ script, processes


@pytest.mark.slow
def test_recipe_script_runs_and_resumes(tmp_path):
    command = [sys.executable, "recipes/codistill.py", "--config", "recipes/configs/codistill_tiny.yaml"]
    command += ["--output_dir", str(tmp_path / "run"), "--heldout_problems", "4", "--max_steps", "2"]
    command += ["--save_steps", "2", "--train_problems", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-2").is_dir() and (tmp_path / "run" / "model.safetensors").is_file()
    assert "heldout" in json.loads((tmp_path / "run" / "results.json").read_text())
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "checkpoint-2" in again.stdout
    # Another step budget changes the learning-rate schedule: refused in one line rather than mixed into this run.
    longer = command[:-6] + ["--max_steps", "3", "--output_dir", str(tmp_path / "run")] + command[-4:]
    refused = subprocess.run(longer, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "max_steps: 2 -> 3" in refused.stderr and "--overwrite_output_dir true" in refused.stderr


@pytest.mark.slow
def test_two_processes_online_and_precomputed(tokenizer, tmp_path):
    accelerate = shutil.which("accelerate") or pytest.fail("accelerate CLI not on PATH")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "tests/distributed/codistill_ddp.py",
        str(tmp_path),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "CODISTILL DDP OK: 2 ranks" in result.stdout
    # The two processes wrote alternate shards; together they hold what one process writes.
    torch.manual_seed(0)
    write_teacher_topk(tiny(**TEACHER_SHAPE), tokenizer, sums_dataset(), tmp_path / "single", top_k=8, shard_size=3)
    together, single = TeacherLogitsStore(tmp_path / "logits"), TeacherLogitsStore(tmp_path / "single")
    for row in range(8):
        for name, value in together.row(row).items():
            torch.testing.assert_close(value, single.row(row)[name], msg=f"row {row} {name}")
