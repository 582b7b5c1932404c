"""Stand-ins for real artefacts too large to ship or to download in a test: small files,
fetched once into the cache by an ordinary package client, that behave like the real
thing where a test needs it to (`tokenizers`: the real Llama-2 and GPT-2 vocabularies;
`build`: LLaVA-1.5-7B's Hub repositories cut in depth and width, `mmpeft standins`)."""
