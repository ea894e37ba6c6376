"""Training recipes for llama4-hf (run from a clone: `accelerate launch recipes/<recipe>.py --config ...`)."""
