"""What travels between the coordinator and workers: message schemas (``messages``), the
tensor codec (``codec``, safetensors, never pickle) and size limits (``limits``). Imports no torch.
"""
