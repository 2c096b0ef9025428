"""Fast tests, one file per loracc module or concept; no PEFT or onnxruntime end to end."""
