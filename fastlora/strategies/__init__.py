"""Fine-tuning strategies beyond LoRA: bottleneck adapters, prompt/prefix tuning, full FT, feature extraction."""
