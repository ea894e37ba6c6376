"""A reward for recipe tests: random tiny models never solve a problem, but their outputs differ in how many
digits they contain, so groups have reward variance and GRPO / DPO have something to learn."""


def digit_share_reward(completions: list, **kwargs) -> list[float]:
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in texts]
