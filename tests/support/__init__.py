"""Shared test builders (PEFT oracle, bad-input corpus, pass cases); the scripts import them too."""
