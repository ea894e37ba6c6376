"""The visual task through transformers' Llama4Processor into our Llama4ForConditionalGeneration: multi-image and
multi-tile prompts, image-aware generation, the `visual` eval task, and the errors for inputs that cannot work.

Needs torchvision (the processor's image half): skipped in the main environment, run in the vision one (see
docs/multimodal.md)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

from eval.generation import generate_completions  # noqa: E402
from eval.loading import InputError, load_multimodal  # noqa: E402
from eval.visual import blind_images, visual_heldout, visual_problems  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny"


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model, processor = load_multimodal(str(TINY), from_scratch=True)
    return model.eval(), processor


@pytest.fixture(scope="module")
def rows():
    return visual_problems("test", 20, seed=0)


def test_multi_image_and_multi_tile_prompts_reach_the_model(model_and_processor, rows):
    model, processor = model_and_processor
    picked = [row for row in rows if row["num_images"] == 8][:1] + [row for row in rows if row["kind"] == "grounding"][
        :1
    ]
    assert len(picked) == 2
    texts = [
        processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in picked
    ]
    inputs = processor(
        text=texts, images=[row["images"] for row in picked], padding=True, padding_side="left",
        add_special_tokens=False, return_tensors="pt",
    )  # fmt: skip
    # 8 single-tile images, then one 112x112 image as 2x2 tiles plus its global view; 4 tokens per 56-pixel tile.
    assert inputs.pixel_values.shape[0] == 8 + 5
    image_tokens = (inputs.input_ids == model.config.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [8 * 4, 5 * 4]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs.input_ids.shape and torch.isfinite(logits).all()
    # The images change the answer: the same prompt with other pixels gives other logits.
    other = processor(text=texts[:1], images=[rows[1]["images"][:1] * 8],
                      add_special_tokens=False, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        changed = model(**other).logits[0, -1]
    assert not torch.allclose(changed, logits[0, -1], atol=1e-5)


def test_generation_with_images_matches_one_prompt_at_a_time(model_and_processor, rows):
    model, processor = model_and_processor
    prompts, images = list(rows["prompt"][:6]), [list(i) for i in rows["images"][:6]]
    batched = generate_completions(model, processor, prompts, images=images, max_new_tokens=4, batch_size=6,
                                   progress=False)  # fmt: skip
    single = [
        generate_completions(model, processor, [p], images=[i], max_new_tokens=4, batch_size=1, progress=False)[0]
        for p, i in zip(prompts, images)
    ]
    assert batched == single
    sampled = generate_completions(model, processor, prompts[:2], images=images[:2], max_new_tokens=4,
                                   num_samples=3, temperature=1.0, progress=False)  # fmt: skip
    assert [len(s) for s in sampled] == [3, 3]


def test_visual_heldout_reports_buckets_and_the_blind_control(model_and_processor, rows):
    model, processor = model_and_processor
    result = visual_heldout(model, processor, rows.select(range(12)), max_new_tokens=4, batch_size=12, progress=False)
    assert set(result["accuracy_by_level"]) == {"1", "2-4", "5-8"}
    assert 0.0 <= result["blind_accuracy"] <= 1.0 and len(result["correct"]) == 12


def test_eval_cli_scores_the_visual_task_per_images_count(model_and_processor, tmp_path):
    from eval.runner import main

    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    results = main(["--model", str(tmp_path / "model"), "--tasks", "visual", "--limit", "8", "--max_new_tokens", "4",
                    "--output_dir", str(tmp_path / "eval"), "--no_progress", "--device", "cpu"])  # fmt: skip
    scores = results["tasks"]["visual"]
    assert scores["num_examples"] == 8 and set(scores["subsets"]) <= {"1", "2-4", "5-8"}
    saved = [json.loads(line) for line in (tmp_path / "eval" / "samples" / "visual.jsonl").read_text().splitlines()]
    assert len(saved) == 8 and all("completions" in record for record in saved)


def test_image_prompts_without_a_processor_are_refused(model_and_processor, rows):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="need the model's processor"):
        generate_completions(model, processor.tokenizer, list(rows["prompt"][:1]), images=[rows["images"][0]],
                             max_new_tokens=2)  # fmt: skip


def test_image_token_count_must_match_the_images(model_and_processor, rows):
    model, processor = model_and_processor
    text = processor.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[rows[0]["images"]], add_special_tokens=False, return_tensors="pt")
    two_images = torch.cat([inputs.pixel_values, inputs.pixel_values])  # features for 2 tiles, tokens for 1
    with pytest.raises(ValueError, match="image"):
        model(input_ids=inputs.input_ids, pixel_values=two_images)


def test_a_text_only_checkpoint_is_refused(tmp_path):
    from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

    Llama4ForCausalLM(Llama4TextConfig.from_pretrained(TINY)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="without a vision tower"):
        load_multimodal(str(tmp_path))


def test_early_fusion_collator_masks_image_tokens_and_packs_whole_documents(model_and_processor, rows):
    from recipes.visual import IMAGE_TOKENS, EarlyFusionCollator

    model, processor = model_and_processor
    grounding = next(row for row in rows if row["kind"] == "grounding")
    documents = [
        {"text": "Question: 2 + 3?\nAnswer: 5", "images": []},
        {"text": "<|image|>A red square. <|image|>A blue circle.", "images": rows[1]["images"]},
        {"text": "<|image|>A shape at the top left.", "images": grounding["images"]},
    ]
    image_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)))
    padded = EarlyFusionCollator(processor)(documents)
    packed = EarlyFusionCollator(processor, pack=True)(documents)
    assert padded["pixel_values"].shape[0] == packed["pixel_values"].shape[0] == 2 + 5
    for batch in (padded, packed):
        is_image = torch.isin(batch["input_ids"], image_ids)
        assert (batch["labels"][is_image] == -100).all()  # no loss on any image token
        assert (batch["input_ids"] == model.config.image_token_id).sum() == batch["pixel_values"].shape[0] * 4
        text = batch["labels"][~is_image & (batch["labels"] != -100)]
        assert len(text) > 20  # the captions and the arithmetic are trained on
    # Packed: one row, positions restart at every document, and each document's tokens are contiguous and whole.
    lengths = padded["attention_mask"].sum(dim=1).tolist()
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert packed["input_ids"].shape == (1, sum(lengths)) and starts == [0, lengths[0], lengths[0] + lengths[1]]
    for row, (start, length) in enumerate(zip(starts, lengths)):
        assert torch.equal(packed["input_ids"][0, start : start + length], padded["input_ids"][row, :length])
    with torch.no_grad():
        assert torch.isfinite(model(**packed).loss) and torch.isfinite(model(**padded).loss)


def test_early_fusion_collator_errors(model_and_processor, rows):
    from recipes.visual import EarlyFusionCollator

    _, processor = model_and_processor
    with pytest.raises(InputError, match="2 <\\|image\\|> markers but 1 images"):
        EarlyFusionCollator(processor)([{"text": "<|image|>a <|image|>b", "images": rows[0]["images"]}])
    with pytest.raises(InputError, match="would split an image's tokens"):
        EarlyFusionCollator(processor, max_length=8)([{"text": "<|image|>A red square.", "images": rows[0]["images"]}])
    cut = EarlyFusionCollator(processor, max_length=8)([{"text": "a long text-only document", "images": []}])
    assert cut["input_ids"].shape[1] == 8  # text-only documents are cut, as in the text recipe


def test_online_rl_refuses_multi_tile_images(model_and_processor, rows):
    from recipes.visual import check_single_tile

    _, processor = model_and_processor
    check_single_tile(rows.filter(lambda row: row["kind"] != "grounding"), processor)
    with pytest.raises(InputError, match="several processor tiles"):
        check_single_tile(rows, processor)


@pytest.mark.slow
def test_online_rl_trains_on_each_rows_own_images(tmp_path, monkeypatch):
    """In GRPO's training step on image prompts (1 to 8 images a prompt, rows shuffled by TRL after the adaptive
    filter merged its groups), the log-probs the loss uses equal each row's own forward with its own images."""
    from trl import ModelConfig

    from recipes import online_rl
    from recipes.rl import OnlineRLConfig, OnlineRLTrainer
    from recipes.validation import run_recipe

    checked = []
    compute_loss = OnlineRLTrainer.compute_loss

    def checking_compute_loss(self, model, inputs, *args, **kwargs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep, counts = inputs["completion_ids"].size(1), inputs["num_images"]
        with torch.no_grad():
            logps = self._get_per_token_logps_and_entropies(
                model, ids, mask, keep, pixel_values=inputs["pixel_values"], num_images=counts
            )[0]
            starts = torch.tensor([0, *counts]).cumsum(0).tolist()
            for row in range(ids.size(0)):
                pixels = inputs["pixel_values"][starts[row] : starts[row + 1]]
                logits = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1], pixel_values=pixels)
                scores = (logits.logits[0, -keep - 1 : -1].float() / self.temperature).log_softmax(-1)
                own = scores.gather(-1, ids[row, -keep:, None]).squeeze(-1)
                done = inputs["completion_mask"][row].bool()
                torch.testing.assert_close(logps[row][done], own[done], atol=1e-4, rtol=1e-4)
        checked.append(sorted(set(counts)))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(OnlineRLTrainer, "compute_loss", checking_compute_loss)
    argv = [
        "--config", "recipes/configs/online_rl_tiny_vision.yaml", "--model_name_or_path", str(TINY),
        "--from_scratch", "true", "--train_problems", "32", "--heldout_problems", "0",
        "--per_device_train_batch_size", "16", "--num_generations", "4", "--max_steps", "2",
        "--max_completion_length", "6", "--temperature", "1.0", "--curriculum_column", "none",
        "--reward_funcs", "tests.recipe_rewards.digit_share_reward", "--reward_weights", "1.0",
        "--pass_rate_reward", "digit_share_reward", "--output_dir", str(tmp_path), "--save_strategy", "no",
    ]  # fmt: skip
    run_recipe(online_rl.main, (online_rl.OnlineRLScriptArguments, OnlineRLConfig, ModelConfig), argv)
    assert len(checked) == 2 and any(len(counts) > 1 for counts in checked)  # rows with different image counts


@pytest.mark.slow
def test_early_fusion_pretraining_reads_colour_from_the_pixels(tmp_path):
    """The pretraining recipe at its configured learning rate teaches the model to read an image: after 100 steps
    on captions ("A red circle."), the caption with the right colour is the likeliest of the four for held-out
    images (summed caption log-likelihood: colour words differ in token count), and for grey images it is not. At
    3e-3 the vision tower's features collapse and colour stays near chance."""
    from trl import ModelConfig, SFTConfig

    from eval.visual import COLOURS, visual_caption
    from recipes import pretrain
    from recipes.validation import run_recipe
    from recipes.visual import EarlyFusionCollator

    argv = [
        "--config", "recipes/configs/pretrain_tiny_vision.yaml", "--model_name_or_path", str(TINY),
        "--visual_kinds", "colour", "--max_images", "1", "--image_documents_fraction", "1.0",
        "--corpus_documents", "1600", "--max_steps", "100", "--warmup_steps", "10", "--heldout_problems", "0",
        "--output_dir", str(tmp_path), "--save_strategy", "no", "--logging_steps", "50",
    ]  # fmt: skip
    run_recipe(pretrain.main, (pretrain.PretrainScriptArguments, SFTConfig, ModelConfig), argv)
    model, processor = load_multimodal(str(tmp_path))
    model.eval()
    collate = EarlyFusionCollator(processor)

    def likeliest_colour(spec: dict, images: list) -> str:
        losses = []
        for colour in COLOURS:
            batch = collate([{"text": "<|image|>" + visual_caption({**spec, "colour": colour}), "images": images}])
            with torch.no_grad():
                targets = int((batch["labels"][:, 1:] != -100).sum())
                losses.append(model(**batch).loss.item() * targets)
        return list(COLOURS)[losses.index(min(losses))]

    heldout = visual_problems("test", 40, kinds=["colour"], max_images=1)
    seen = blind = 0
    for row in heldout:
        spec = json.loads(row["image_keys"][0])
        seen += likeliest_colour(spec, row["images"]) == spec["colour"]
        blind += likeliest_colour(spec, blind_images(row["images"])) == spec["colour"]
    assert seen / len(heldout) >= 0.9, (seen, blind)
    assert blind / len(heldout) <= 0.5, (seen, blind)
