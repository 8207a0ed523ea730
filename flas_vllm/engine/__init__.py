"""FLAS inside vLLM: the steered model class, the per-step runtime and concept slots, the plugin, FlasLLM, and the version-guarded patches."""
