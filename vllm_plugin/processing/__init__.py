"""What runs in the API process, where vLLM turns a request into the engine's input: the pruning
processor mixin (K per image, placeholders, hashing, per-image fields) and the ledger that hands the
server each request's token counts. Nothing here runs on the GPU."""
