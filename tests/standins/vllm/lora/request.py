"""Stand-in for vllm.lora.request (see tests/standins/vllm)."""

from __future__ import annotations


class LoRARequest:
    def __init__(self, name: str, lora_id: int, path: str):
        self.name, self.lora_id, self.path = name, lora_id, path
