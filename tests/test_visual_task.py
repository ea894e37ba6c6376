"""The visual task generator (eval/visual.py): determinism, disjoint splits, answers that need the image."""

import importlib.util
from collections import Counter, defaultdict

import numpy as np
import pytest

from eval.visual import (
    COLOURS,
    IMAGE_BUCKETS,
    MAX_IMAGES,
    QUADRANTS,
    blind_images,
    visual_answer_correct,
    visual_problems,
)


@pytest.fixture(scope="module")
def splits():
    return visual_problems("train", 300, seed=0), visual_problems("test", 150, seed=0)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def _colour_of(pixels: np.ndarray) -> str:
    """The named colour nearest the mean of the non-black pixels."""
    lit = pixels[pixels.sum(axis=-1) > 60]
    mean = lit.mean(axis=0)
    return min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - mean) ** 2).sum()))


def _lit_quadrants(pixels: np.ndarray) -> list[str]:
    height, width = pixels.shape[:2]
    lit = pixels.sum(axis=-1) > 60
    found = []
    for index, name in enumerate(QUADRANTS):
        row, column = divmod(index, 2)
        block = lit[row * height // 2 : (row + 1) * height // 2, column * width // 2 : (column + 1) * width // 2]
        if block.sum() > 20:
            found.append(name)
    return found


def _answer_from_image(row) -> str:
    """A pixel-level reader: what the gold answer must be, from the images and the image index alone."""
    images = [_pixels(image) for image in row["images"]]
    question = row["prompt"][0]["content"][-1]["text"]
    if row["kind"] == "colour":
        target = int(question.split("image ")[1].split("?")[0]) - 1 if len(images) > 1 else 0
        return _colour_of(images[target])
    if row["kind"] == "count":
        return str(len(_lit_quadrants(images[0])))
    (quadrant,) = _lit_quadrants(images[0])
    return quadrant


def test_same_arguments_same_rows():
    first, second = visual_problems("test", 20, seed=3), visual_problems("test", 20, seed=3)
    assert first["image_keys"] == second["image_keys"] and first["answer"] == second["answer"]
    for a, b in zip(first["images"], second["images"]):
        assert [x.tobytes() for x in a] == [x.tobytes() for x in b]
    other = visual_problems("test", 20, seed=4)
    assert other["image_keys"] != first["image_keys"]


def test_splits_share_no_image(splits):
    train, test = splits
    train_keys = {key for keys in train["image_keys"] for key in keys}
    test_keys = {key for keys in test["image_keys"] for key in keys}
    assert not train_keys & test_keys
    # Pixels too, not just the parameters: no held-out image is drawn identically in train.
    train_pixels = {image.tobytes() for images in train["images"] for image in images}
    assert not any(image.tobytes() in train_pixels for images in test["images"] for image in images)
    # Within a split every image appears once.
    assert len(train_keys) == sum(map(len, train["image_keys"]))


def test_answers_are_read_from_the_images(splits):
    for dataset in splits:
        for row in dataset:
            assert _answer_from_image(row) == row["answer"], row["image_keys"]
            assert row["completion"][0]["content"].endswith(f"\\boxed{{{row['answer']}}}.")
            placeholders = sum(part["type"] == "image" for part in row["prompt"][0]["content"])
            assert placeholders == len(row["images"]) == row["num_images"]


def test_text_alone_is_near_chance(splits):
    """The best text-only guesser (the most common train answer for each question text) scores near chance."""
    train, test = splits

    def question(row):
        return "".join(part["text"] or "<image>" for part in row["prompt"][0]["content"])

    answers = defaultdict(Counter)
    for row in train:
        answers[question(row)][row["answer"]] += 1
    guesses = [answers[question(row)].most_common(1)[0][0] if answers[question(row)] else "" for row in test]
    accuracy = np.mean([guess == row["answer"] for guess, row in zip(guesses, test)])
    chance = np.mean([{"colour": 1 / 4, "count": 1 / 4, "grounding": 1 / 4}[kind] for kind in test["kind"]])
    assert accuracy < chance + 0.15, (accuracy, chance)


def test_images_counts_cover_every_bucket(splits):
    train, _ = splits
    assert set(train["images_bucket"]) == set(IMAGE_BUCKETS)
    assert max(train["num_images"]) == MAX_IMAGES and min(train["num_images"]) == 1
    grounding = [row for row in train if row["kind"] == "grounding"]
    assert grounding and all(row["images"][0].size == (112, 112) for row in grounding)  # 2x2 tiles


def test_blind_images_keep_sizes_and_lose_content(splits):
    row = splits[0][0]
    blind = blind_images(row["images"])
    assert [image.size for image in blind] == [image.size for image in row["images"]]
    assert len({image.tobytes() for image in blind}) == 1


def test_grading():
    assert visual_answer_correct("The answer is \\boxed{ Top  Left }.", "top left")
    assert not visual_answer_correct("The answer is \\boxed{top right}.", "top left")
    assert not visual_answer_correct("red", "red")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_images": MAX_IMAGES + 1}, "max_images=9"),
        ({"max_images": 0}, "max_images=0"),
        ({"kinds": ["colours"]}, "unknown kinds"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        visual_problems("train", 4, **kwargs)
    with pytest.raises(ValueError, match="split must be"):
        visual_problems("validation", 4)


def test_visual_rows_are_checked_against_their_images():
    from datasets import Dataset

    from eval.loading import InputError
    from recipes.visual import check_visual_rows, refuse_images_without_processor

    rows = visual_problems("train", 12, seed=0)
    check_visual_rows(rows, MAX_IMAGES)
    first = next(index for index, n in enumerate(rows["num_images"]) if n > 4)
    count = rows["num_images"][first]
    with pytest.raises(InputError, match=f"row {first} has {count} images, more than --max_images 4"):
        check_visual_rows(rows, 4)
    broken = rows.to_list()
    broken[3]["images"] = broken[3]["images"] + broken[0]["images"]
    with pytest.raises(InputError, match="row 3: the prompt has .* image entries .* but the row has"):
        check_visual_rows(Dataset.from_list(broken), MAX_IMAGES)
    with pytest.raises(InputError, match="needs an `images` column"):
        check_visual_rows(rows.remove_columns("images"), MAX_IMAGES)

    class TextRecipe:
        task = "arithmetic"

    with pytest.raises(InputError, match="pass --task visual"):
        refuse_images_without_processor(rows, TextRecipe())


def test_adaptive_filter_keeps_each_prompts_images():
    """GRPO outputs hold pixel_values per image: merging chosen groups takes exactly those rows' images."""
    import torch

    from recipes.rl import _select_images

    def output(counts, offset):
        pixels = torch.cat([torch.full((n, 3, 2, 2), float(offset + row)) for row, n in enumerate(counts)])
        return {"pixel_values": pixels, "num_images": counts}

    first, second = output([1, 3, 2, 1], 0), output([2, 1, 1, 4], 10)
    pixels, counts = _select_images([(first, [1]), (second, [0])], [[1, 3], [0, 3]])
    assert counts == [3, 1, 2, 4]
    assert pixels[:, 0, 0, 0].tolist() == [1, 1, 1, 3, 10, 10, 13, 13, 13, 13]


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="checks the error without torchvision")
def test_without_torchvision_the_visual_path_says_how_to_get_it(tmp_path):
    from eval.loading import InputError, load_multimodal

    with pytest.raises(InputError, match="needs torchvision, which is not installed.*torch==2.14.1"):
        load_multimodal("hub_configs/tiny", from_scratch=True)


def test_unknown_visual_kinds_are_refused_before_a_model_loads():
    from types import SimpleNamespace

    from eval.loading import InputError
    from recipes.visual import visual_datasets, visual_model_and_processor

    task_args = SimpleNamespace(max_images=8, visual_kinds=["colour", "shapes"], fp8=False, load_in_int4=False)
    with pytest.raises(InputError, match=r"--visual_kinds \['shapes'\]"):
        visual_model_and_processor(SimpleNamespace(), task_args, SimpleNamespace())
    args = SimpleNamespace(
        dataset_name=None, task_seed=0, max_images=8, visual_kinds=["shapes"], train_problems=4, heldout_problems=0
    )
    with pytest.raises(InputError, match="--visual_kinds"):
        visual_datasets(args)
