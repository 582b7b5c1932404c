"""Instruction data from captions and boxes with a text LLM (the `data_gen` tool's library)."""
