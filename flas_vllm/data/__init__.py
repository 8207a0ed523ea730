"""Bundled data: AlpacaEval instructions, AxBench concept lists and judge templates, the playground page (SOURCES.md names each source)."""
