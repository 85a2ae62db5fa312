"""Ray actors that wrap dymu/ and the I/O: frame decoding, vision encoding, the token cache, the LLM."""
