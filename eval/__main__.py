"""`python -m eval --model PATH --tasks math500,gpqa_diamond,mgsm [--data_dir DIR] [--limit N] [--num_samples N]`."""

from .runner import main

if __name__ == "__main__":
    main()
