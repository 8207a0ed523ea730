"""The FLAS math and contracts: flow, RoPE, model-family facts, configs, checkpoints, steering fields, concept and prompt formats. Imports no vLLM."""
