"""loracc's tests: unit/ (fast, per module), e2e/ (against PEFT and onnxruntime), support/."""
