"""Model assemblies: LLaVA, and the parts MiniGPT-5 and GILL add to it."""
