"""End-to-end tests: loracc against PEFT's numbers and onnxruntime sessions; CLI, scripts."""
