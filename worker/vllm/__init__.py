"""The vLLM backend of a worker: the engine driver and its host-swap bookkeeping, its
backend adapter, the recording scheduler and KV swap extension it plugs into vLLM, the
profiler, and the tiny models and detokenizer the tests and demo use. Imports vLLM only when
an engine starts."""
