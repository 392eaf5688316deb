"""Real-task quality study: PEDRO vs LoRA vs IA3 on SmolLM2-135M-Instruct (python -m bench.quality)."""
