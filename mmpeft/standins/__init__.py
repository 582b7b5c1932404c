"""Stand-ins for real artefacts too large to ship or to download in a test: small files,
fetched once into the cache by an ordinary package client, that behave like the real
thing where a test needs it to (`tokenizers`: the real Llama-2 and GPT-2 vocabularies;
`clip_vocab`: CLIP's real BPE; `build`, `mmpeft standins`: the Hub repositories of the
models the recipes load, cut in depth and width, with CLIP's in `clip` and Stable
Diffusion's in `diffusion`)."""
