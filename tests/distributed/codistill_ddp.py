"""Run under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... OUTPUT_DIR`: the two
processes write a teacher-logits store together (alternate shards), then train a student with an online teacher and
with the store; both ranks must end with the same weights, the teacher untouched."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoTokenizer

from recipes.trainers import CoDistillationTrainer, write_teacher_topk
from tests.test_codistill import TEACHER_SHAPE, TINY, config, snapshot, sums_dataset, tiny


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    out = Path(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    torch.manual_seed(0)
    teacher = tiny(**TEACHER_SHAPE)
    teacher_before = snapshot(teacher)
    counts = write_teacher_topk(teacher, tokenizer, sums_dataset(), out / "logits", top_k=8, shard_size=3)
    state = PartialState()  # after the writer's config set it up (a bare PartialState() stays single-process on CPU)
    assert state.num_processes == 2, f"expected 2 processes, got {state.num_processes}"
    assert counts["written"] == (2 if state.process_index == 0 else 1), counts

    results = []
    for name, kwargs in (("online", {"teacher_model": teacher}), ("precomputed", {})):
        torch.manual_seed(1)
        student = tiny()
        initial = flat(student)
        extra = {} if kwargs else {"teacher_logits_path": str(out / "logits")}
        args = config(out / name, per_device_train_batch_size=2, **extra)
        trainer = CoDistillationTrainer(
            model=student, args=args, train_dataset=sums_dataset(), processing_class=tokenizer, **kwargs
        )
        trainer.train()
        weights = flat(trainer.accelerator.unwrap_model(trainer.model))
        gathered = trainer.accelerator.gather(weights[None])
        assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks diverged"
        assert (weights - initial).abs().max() > 1e-5, f"{name}: training did not move the weights"
        log = [log for log in trainer.state.log_history if "loss" in log][-1]
        assert log["soft_loss"] > 0 and log["num_tokens"] > 0, log
        results.append(f"{name} soft {log['soft_loss']:.4f} hard {log['hard_loss']:.4f}")
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters()), "teacher changed"
    if state.is_main_process:
        print(f"CODISTILL DDP OK: 2 ranks in step; {'; '.join(results)}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
