"""The ONNX lowerings: bind an adapter to an existing ONNX export, then merge or add slots.

``index`` (the graph's weight uses), ``bind`` (sites and whole-tensor edits onto them),
``weights`` (the bound initializers as base weights for passes), ``surgery`` (lifting constants,
splitting shared initializers), ``merge`` (edit initializers) and ``lora`` (LoRA branches with
onnxruntime adapter slots).
"""
